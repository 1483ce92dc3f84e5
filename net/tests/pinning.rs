//! Real QUIC over loopback with real certificates: pinned mutual TLS, refusals, frames.

use chartmesh_core::PracticeId;
use chartmesh_net::{
    Credentials, Endpoint, FrameError, MAX_FRAME, PinSet, read_frame, write_frame,
};

fn creds() -> (Credentials, PracticeId) {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["chartmesh".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let der = cert.der().to_vec();
    (
        Credentials {
            cert_der: der.clone(),
            key_der: key.serialize_der(),
        },
        PracticeId::from_certificate_der(&der),
    )
}

fn loopback() -> std::net::SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

#[tokio::test]
async fn paired_practices_connect_and_exchange_frames() {
    let (ca, ida) = creds();
    let (cb, idb) = creds();
    let a = Endpoint::bind(loopback(), &ca, PinSet::new([idb])).unwrap();
    let b = Endpoint::bind(loopback(), &cb, PinSet::new([ida])).unwrap();
    let addr = a.local_addr();
    let server = tokio::spawn(async move {
        let pc = a.accept().await.unwrap();
        assert_eq!(
            pc.peer, idb,
            "the server learns the client's practice from the handshake"
        );
        let (mut send, mut recv) = pc.connection.accept_bi().await.unwrap();
        let got = read_frame(&mut recv, MAX_FRAME).await.unwrap().unwrap();
        write_frame(&mut send, &got.iter().rev().copied().collect::<Vec<_>>())
            .await
            .unwrap();
        send.finish().unwrap();
        // An oversized frame announced by the peer is refused before it is read.
        let (_s2, mut r2) = pc.connection.accept_bi().await.unwrap();
        let e = read_frame(&mut r2, 1024).await.unwrap_err();
        assert!(
            matches!(
                e,
                FrameError::TooLarge {
                    size: 4096,
                    limit: 1024
                }
            ),
            "{e}"
        );
        pc.connection.closed().await;
        a
    });
    let pc = b.connect(addr, ida).await.unwrap();
    assert_eq!(pc.peer, ida);
    let (mut send, mut recv) = pc.connection.open_bi().await.unwrap();
    write_frame(&mut send, b"hello").await.unwrap();
    send.finish().unwrap();
    assert_eq!(
        read_frame(&mut recv, MAX_FRAME).await.unwrap().unwrap(),
        b"olleh"
    );
    assert!(
        read_frame(&mut recv, MAX_FRAME).await.unwrap().is_none(),
        "clean end of stream"
    );
    let (mut s2, _r2) = pc.connection.open_bi().await.unwrap();
    write_frame(&mut s2, &vec![7u8; 4096]).await.unwrap();
    let _ = s2.finish();
    // Give the server time to read the announcement, then close.
    let a = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        pc.connection.close(0u32.into(), b"done");
        server.await.unwrap()
    })
    .await
    .expect("server finished");
    assert!(a.pins().take_refusals().is_empty());
}

#[tokio::test]
async fn an_unpaired_client_cannot_complete_the_handshake_and_is_recorded() {
    let (ca, ida) = creds();
    let (cb, _idb) = creds();
    let a = Endpoint::bind(loopback(), &ca, PinSet::new([])).unwrap(); // A knows nobody
    let b = Endpoint::bind(loopback(), &cb, PinSet::new([ida])).unwrap(); // B trusts A
    let addr = a.local_addr();
    let accept = tokio::spawn(async move {
        let r = tokio::time::timeout(std::time::Duration::from_millis(1500), a.accept()).await;
        (r.is_err(), a)
    });
    let r = b.connect(addr, ida).await;
    // TLS 1.3: the client may finish its side before the server's refusal arrives; the
    // connection is then closed by the server, and no stream can be used.
    if let Ok(pc) = r {
        let opened = async {
            let io = |e: &dyn std::fmt::Display| std::io::Error::other(e.to_string());
            let (mut s, mut r) = pc.connection.open_bi().await.map_err(|e| io(&e))?;
            s.write_all(b"\0\0\0\x01x").await.map_err(|e| io(&e))?;
            let mut buf = [0u8; 1];
            r.read_exact(&mut buf).await.map_err(|e| io(&e))?;
            Ok::<_, std::io::Error>(())
        };
        assert!(
            opened.await.is_err(),
            "an unpaired client must not get a usable connection"
        );
    }
    let (timed_out, a) = accept.await.unwrap();
    assert!(
        timed_out,
        "the server never hands an unpaired connection to the application"
    );
    let refused = a.pins().take_refusals();
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].role, "client");
}

#[tokio::test]
async fn a_client_refuses_a_server_that_is_not_the_pinned_practice() {
    let (ca, ida) = creds();
    let (cb, idb) = creds();
    let (_cc, idc) = creds();
    let a = Endpoint::bind(loopback(), &ca, PinSet::new([idb])).unwrap();
    let b = Endpoint::bind(loopback(), &cb, PinSet::new([idc])).unwrap(); // B pins C, not A
    let addr = a.local_addr();
    let _server = tokio::spawn(async move { a.accept().await.map(|_| ()) });
    let e = b.connect(addr, ida).await.err().expect("refused");
    assert!(e.to_string().contains("connecting"), "{e}");
    assert_eq!(b.pins().take_refusals()[0].role, "server");
    // Pairing takes effect for the next handshake, without restarting the endpoint.
    b.pins().add(ida);
    b.pins().remove(&idc);
    assert!(b.pins().contains(&ida) && !b.pins().contains(&idc));
}
