//! Network namespaces for the NAT and relay tests: clinics behind their own NAT routers
//! (iptables MASQUERADE), a relay on an "internet" namespace between them, and nothing
//! else — traffic stays inside namespaces the test made. A [`Lab`] deletes its namespaces
//! (and with them their links, addresses and iptables rules) when dropped, also while a
//! failing test unwinds.
//!
//! Layout of [`Lab::two_nats`] (P is a per-test prefix):
//!
//! ```text
//! P-ca 192.168.10.2 ── 192.168.10.1 P-ra 10.77.1.2 ── 10.77.1.1 ┐
//!                                   (MASQUERADE)                 P-inet (relay on 10.77.0.1)
//! P-cb 192.168.20.2 ── 192.168.20.1 P-rb 10.77.2.2 ── 10.77.2.1 ┘
//! ```
//! The internet namespace has no route to either clinic's network: a clinic is reachable
//! only through its router's NAT, i.e. not at all from outside.

use std::process::Command;

/// Why `tc netem` cannot be used here (the kernel lacks sch_netem), if it cannot.
pub fn netem_unavailable() -> Option<String> {
    if let Some(why) = unavailable(&["ip", "tc"]) {
        return Some(why);
    }
    let probe = format!("cmnetem{}", std::process::id());
    let _ = Command::new("ip").args(["netns", "add", &probe]).status();
    let ok = Command::new("ip")
        .args([
            "netns", "exec", &probe, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay",
            "1ms",
        ])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let _ = Command::new("ip").args(["netns", "del", &probe]).status();
    (!ok).then(|| "this kernel has no netem qdisc (CONFIG_NET_SCH_NETEM)".to_string())
}

/// Why namespace tests cannot run here, if they cannot (not root, a tool missing).
pub fn unavailable(tools: &[&str]) -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root (network namespaces need CAP_NET_ADMIN)".into());
    }
    for t in tools {
        let found = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(t).is_file()))
            || ["/usr/sbin", "/sbin", "/usr/bin"]
                .iter()
                .any(|d| std::path::Path::new(d).join(t).is_file());
        if !found {
            return Some(format!("`{t}` is not installed (bash .ci/run installs it)"));
        }
    }
    let probe = format!("cmprobe{}", std::process::id());
    let ok = Command::new("ip")
        .args(["netns", "add", &probe])
        .status()
        .is_ok_and(|s| s.success());
    let _ = Command::new("ip").args(["netns", "del", &probe]).status();
    if !ok {
        return Some("cannot create a network namespace here".into());
    }
    None
}

/// Runs a shell command (in `ns`, if given); panics with its output if it fails.
pub fn sh(ns: Option<&str>, cmd: &str) -> String {
    let out = match ns {
        Some(ns) => Command::new("ip")
            .args(["netns", "exec", ns, "sh", "-c", cmd])
            .output(),
        None => Command::new("sh").args(["-c", cmd]).output(),
    }
    .expect("sh runs");
    assert!(
        out.status.success(),
        "`{cmd}` in {ns:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A set of namespaces, deleted on drop.
pub struct Lab {
    pub prefix: String,
    namespaces: Vec<String>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// The relay's address in [`Lab::two_nats`].
pub const RELAY_IP: &str = "10.77.0.1";

impl Lab {
    fn new(tag: &str) -> Lab {
        // Short: interface names are limited to 15 characters. One digit tells apart the
        // labs of tests running at once in one process.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 10;
        let prefix = format!("{tag}{}{n}", std::process::id() % 100_000);
        Lab {
            prefix,
            namespaces: Vec::new(),
        }
    }

    /// The full name of namespace `short`.
    pub fn ns(&self, short: &str) -> String {
        format!("{}-{short}", self.prefix)
    }

    fn add_ns(&mut self, short: &str) -> String {
        let ns = self.ns(short);
        let _ = Command::new("ip")
            .args(["netns", "del", &ns])
            .stderr(std::process::Stdio::null())
            .status();
        sh(None, &format!("ip netns add {ns}"));
        self.namespaces.push(ns.clone());
        sh(Some(&ns), "ip link set lo up");
        ns
    }

    /// A veth between `a` (address `a_ip`) and `b` (address `b_ip`), both /24.
    fn link(&self, a: &str, a_ip: &str, b: &str, b_ip: &str) {
        let (na, nb) = (self.ns(a), self.ns(b));
        let (ia, ib) = (
            format!("{}{a}{b}", self.prefix),
            format!("{}{b}{a}", self.prefix),
        );
        sh(
            None,
            &format!("ip link add {ia} netns {na} type veth peer name {ib} netns {nb}"),
        );
        sh(
            Some(&na),
            &format!("ip addr add {a_ip}/24 dev {ia} && ip link set {ia} up"),
        );
        sh(
            Some(&nb),
            &format!("ip addr add {b_ip}/24 dev {ib} && ip link set {ib} up"),
        );
    }

    /// The WAN interface of router `r` (`ra` or `rb`).
    pub fn wan(&self, r: &str) -> String {
        format!("{}{r}inet", self.prefix)
    }

    /// Two clinics (`ca`, `cb`), each behind its own NAT router (`ra`, `rb`), and the
    /// internet (`inet`) between the routers, holding [`RELAY_IP`].
    pub fn two_nats() -> Lab {
        let mut lab = Lab::new("cm");
        for ns in ["inet", "ra", "rb", "ca", "cb"] {
            lab.add_ns(ns);
        }
        lab.link("ra", "10.77.1.2", "inet", "10.77.1.1");
        lab.link("rb", "10.77.2.2", "inet", "10.77.2.1");
        lab.link("ca", "192.168.10.2", "ra", "192.168.10.1");
        lab.link("cb", "192.168.20.2", "rb", "192.168.20.1");
        let inet = lab.ns("inet");
        sh(
            Some(&inet),
            &format!("ip addr add {RELAY_IP}/32 dev lo && sysctl -qw net.ipv4.ip_forward=1"),
        );
        for (r, up) in [("ra", "10.77.1.1"), ("rb", "10.77.2.1")] {
            let ns = lab.ns(r);
            sh(
                Some(&ns),
                &format!(
                    "sysctl -qw net.ipv4.ip_forward=1 && ip route add default via {up} && \
                     iptables -t nat -A POSTROUTING -o {} -j MASQUERADE",
                    lab.wan(r)
                ),
            );
        }
        sh(Some(&lab.ns("ca")), "ip route add default via 192.168.10.1");
        sh(Some(&lab.ns("cb")), "ip route add default via 192.168.20.1");
        lab
    }

    /// Two practices' machines (`la` 10.88.0.1, `lb` 10.88.0.2) on one LAN (a veth between
    /// them).
    pub fn lan() -> Lab {
        let mut lab = Lab::new("cl");
        lab.add_ns("la");
        lab.add_ns("lb");
        lab.link("la", "10.88.0.1", "lb", "10.88.0.2");
        lab
    }

    /// The interface of `a` facing `b`.
    pub fn iface(&self, a: &str, b: &str) -> String {
        format!("{}{a}{b}", self.prefix)
    }

    /// Restarts router `r`'s NAT: its translations are forgotten and new ones use other
    /// external ports, as when a mobile router reboots.
    pub fn restart_nat(&self, r: &str) {
        let ns = self.ns(r);
        let wan = self.wan(r);
        sh(
            Some(&ns),
            &format!(
                "iptables -t nat -F POSTROUTING && conntrack -F 2>/dev/null; \
                 iptables -t nat -A POSTROUTING -o {wan} -p tcp -j MASQUERADE --to-ports 20000-29999 --random && \
                 iptables -t nat -A POSTROUTING -o {wan} -p udp -j MASQUERADE --to-ports 20000-29999 --random && \
                 iptables -t nat -A POSTROUTING -o {wan} -j MASQUERADE"
            ),
        );
    }
}

impl Lab {
    /// Makes router `r` a NAT that maps every new destination to a new, random external
    /// port (`MASQUERADE --random-fully`): the mapping a peer sees differs from the one a
    /// STUN server saw, so hole punching through it fails.
    pub fn random_fully(&self, r: &str) {
        let wan = self.wan(r);
        sh(
            Some(&self.ns(r)),
            &format!(
                "iptables -t nat -F POSTROUTING && conntrack -F 2>/dev/null; \
                 iptables -t nat -A POSTROUTING -o {wan} -j MASQUERADE --random-fully"
            ),
        );
    }

    /// Limits TCP (the relay's traffic) to `kbit` kbit/s on its way from the internet to
    /// each router (an HTB class chosen by a u32 filter on the protocol), leaving UDP (STUN,
    /// a direct path) as it is: a relayed sync then takes a while.
    pub fn slow_tcp(&self, kbit: u32) {
        for r in ["ra", "rb"] {
            let dev = self.iface("inet", r);
            sh(
                Some(&self.ns("inet")),
                &format!(
                    "tc qdisc add dev {dev} root handle 1: htb default 10 r2q 1000 && \
                     tc class add dev {dev} parent 1: classid 1:10 htb rate 1gbit && \
                     tc class add dev {dev} parent 1: classid 1:20 htb rate {kbit}kbit && \
                     tc filter add dev {dev} protocol ip parent 1:0 prio 1 u32 match ip protocol 6 0xff flowid 1:20"
                ),
            );
        }
    }

    /// Whether [`Lab::slow_tcp`] can work here (the kernel has HTB and u32 filters).
    pub fn can_shape() -> bool {
        let probe = format!("cmhtb{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "add", &probe]).status();
        let ok = Command::new("ip")
            .args(["netns", "exec", &probe, "sh", "-c"])
            .arg(
                "tc qdisc add dev lo root handle 1: htb default 10 && \
                 tc class add dev lo parent 1: classid 1:20 htb rate 1mbit && \
                 tc filter add dev lo protocol ip parent 1:0 prio 1 u32 match ip protocol 6 0xff flowid 1:20",
            )
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        let _ = Command::new("ip").args(["netns", "del", &probe]).status();
        ok
    }

    /// Drops (`block`) or lets through again UDP between the two routers of
    /// [`Lab::two_nats`]: their direct path, while the relay and STUN (on the internet
    /// namespace itself) stay reachable.
    pub fn block_direct_udp(&self, block: bool) {
        let op = if block { "-I" } else { "-D" };
        sh(
            Some(&self.ns("inet")),
            &format!(
                "iptables {op} FORWARD -p udp -s 10.77.1.0/24 -d 10.77.2.0/24 -j DROP && \
                 iptables {op} FORWARD -p udp -s 10.77.2.0/24 -d 10.77.1.0/24 -j DROP"
            ),
        );
    }
}

/// Runs `f` on a thread inside namespace `ns` (for a socket that must live there, e.g. an
/// HTTP call to a daemon's loopback API in that namespace).
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        use std::os::fd::AsRawFd;
        // SAFETY: a valid namespace file descriptor; affects only this thread.
        let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("netns thread")
}
