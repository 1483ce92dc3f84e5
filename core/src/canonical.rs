//! Canonical JSON and the chart-set checksum defined by the benchmark: compact JSON, object
//! keys sorted by UTF-16 code units, numbers in their shortest round-trip form as JavaScript
//! prints them, strings escaped as `JSON.stringify` does. The checksum of a set of charts is
//! the SHA-256 of the sorted lines `<id>:<sha256(canonical chart)>` joined by `\n`.

use serde_json::{Number, Value};
use sha2::{Digest, Sha256};

/// Appends the canonical JSON of `v` to `out`.
pub fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => write_number(n, out),
        Value::String(s) => write_string(s, out),
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(x, out);
            }
            out.push(']');
        }
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort_by(|a, b| a.encode_utf16().cmp(b.encode_utf16()));
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(k, out);
                out.push(':');
                write_canonical(&m[k], out);
            }
            out.push('}');
        }
    }
}

pub fn to_canonical(v: &Value) -> String {
    let mut s = String::with_capacity(4096);
    write_canonical(v, &mut s);
    s
}

fn write_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

fn write_number(n: &Number, out: &mut String) {
    if let Some(i) = n.as_i64() {
        out.push_str(&i.to_string());
    } else if let Some(u) = n.as_u64() {
        out.push_str(&u.to_string());
    } else if let Some(f) = n.as_f64() {
        out.push_str(&js_number(f));
    }
}

/// Formats a float as JavaScript's `Number.prototype.toString` does (shortest round trip).
pub fn js_number(f: f64) -> String {
    if f == 0.0 {
        return "0".into();
    }
    if !f.is_finite() {
        return "null".into();
    }
    // Rust's `{:e}` gives the shortest round-trip digits: "d.ddddde<exp>".
    let sci = format!("{:e}", f.abs());
    let (mant, exp) = sci.split_once('e').expect("exponent form");
    let exp: i32 = exp.parse().expect("exponent");
    let digits: String = mant.chars().filter(|c| *c != '.').collect();
    let k = digits.len() as i32;
    let n = exp + 1; // position of the decimal point relative to the digits
    let mut s = String::new();
    if f < 0.0 {
        s.push('-');
    }
    if k <= n && n <= 21 {
        s.push_str(&digits);
        s.extend(std::iter::repeat_n('0', (n - k) as usize));
    } else if 0 < n && n <= 21 {
        s.push_str(&digits[..n as usize]);
        s.push('.');
        s.push_str(&digits[n as usize..]);
    } else if -6 < n && n <= 0 {
        s.push_str("0.");
        s.extend(std::iter::repeat_n('0', (-n) as usize));
        s.push_str(&digits);
    } else {
        let e = n - 1;
        s.push_str(&digits[..1]);
        if k > 1 {
            s.push('.');
            s.push_str(&digits[1..]);
        }
        s.push('e');
        s.push(if e >= 0 { '+' } else { '-' });
        s.push_str(&e.abs().to_string());
    }
    s
}

/// SHA-256 (hex) of a chart's canonical JSON.
pub fn chart_hash(chart: &Value) -> String {
    hex::encode(Sha256::digest(to_canonical(chart).as_bytes()))
}

/// Accumulates the set checksum of many charts, in any order.
#[derive(Default, Debug, Clone)]
pub struct SetChecksum {
    lines: Vec<String>,
}

impl SetChecksum {
    pub fn add(&mut self, id: &str, chart: &Value) {
        self.lines.push(format!("{id}:{}", chart_hash(chart)));
    }
    pub fn add_hash(&mut self, id: &str, hash: &str) {
        self.lines.push(format!("{id}:{hash}"));
    }
    pub fn count(&self) -> usize {
        self.lines.len()
    }
    pub fn finish(mut self) -> String {
        self.lines.sort();
        hex::encode(Sha256::digest(self.lines.join("\n").as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn numbers_print_as_javascript_does() {
        for (f, s) in [
            (36.6, "36.6"),
            (131.0, "131"),
            (0.59, "0.59"),
            (1e21, "1e+21"),
            (1e-7, "1e-7"),
            (0.000001, "0.000001"),
            (123456789012.5, "123456789012.5"),
            (-2.5, "-2.5"),
            (1.5e300, "1.5e+300"),
        ] {
            assert_eq!(js_number(f), s, "{f}");
        }
    }

    #[test]
    fn keys_sort_and_strings_escape() {
        let v = json!({"b": 1, "a": [true, null, "x\"\n\u{1}é"], "A": 2.50});
        assert_eq!(
            to_canonical(&v),
            r#"{"A":2.5,"a":[true,null,"x\"\n\u0001é"],"b":1}"#
        );
    }

    #[test]
    fn set_checksum_is_order_independent() {
        let mut a = SetChecksum::default();
        a.add("x", &json!({"k": 1}));
        a.add("y", &json!({"k": 2}));
        let mut b = SetChecksum::default();
        b.add("y", &json!({"k": 2}));
        b.add("x", &json!({"k": 1}));
        assert_eq!(a.finish(), b.finish());
    }
}
