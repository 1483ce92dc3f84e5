//! JSON for FHIR with decimals kept as written.
//!
//! FHIR decimals carry their precision in their text (`1.20` is not `1.2`), and a long value
//! must keep every digit. `serde_json::Value` holds numbers as `f64`, so this module reads a
//! FHIR document with every non-integer number (and every integer too long for `f64`) turned
//! into a *decimal marker*: a string `"\u{0}#<the number's text>"`. Readers take numbers
//! through [`decimal`]; writers put them with [`number`] and serialize with [`to_string`] /
//! [`to_string_pretty`], which turn markers back into the numbers they stand for. A chart
//! field can never hold a NUL character (chart validation refuses it), so no content can be
//! taken for a marker.

use serde_json::Value;

use crate::chart::{Decimal, is_json_number};

/// The prefix of a decimal marker.
const MARK: &str = "\u{0}#";

/// Reads a FHIR JSON document (a UTF-8 byte-order mark is skipped), decimals as markers.
pub fn parse(bytes: &[u8]) -> Result<Value, serde_json::Error> {
    serde_json::from_slice(&mark_decimals(strip_bom(bytes)))
}

/// The bytes without a leading UTF-8 byte-order mark.
pub fn strip_bom(bytes: &[u8]) -> &[u8] {
    bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes)
}

/// Rewrites every number that `f64` could not carry exactly as a marker string.
fn mark_decimals(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len() + b.len() / 16);
    let mut i = 0;
    let mut in_string = false;
    while i < b.len() {
        let c = b[i];
        if in_string {
            out.push(c);
            if c == b'\\' && i + 1 < b.len() {
                out.push(b[i + 1]);
                i += 2;
                continue;
            }
            if c == b'"' {
                in_string = false;
            }
            i += 1;
            continue;
        }
        match c {
            b'"' => {
                in_string = true;
                out.push(c);
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let s = i;
                while i < b.len() && matches!(b[i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
                {
                    i += 1;
                }
                let tok = &b[s..i];
                let digits = tok.iter().filter(|x| x.is_ascii_digit()).count();
                let decimal = tok.iter().any(|x| matches!(x, b'.' | b'e' | b'E')) || digits > 15;
                if decimal && is_json_number(tok) {
                    out.extend_from_slice(b"\"\\u0000#");
                    out.extend_from_slice(tok);
                    out.push(b'"');
                } else {
                    out.extend_from_slice(tok);
                }
            }
            _ => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// A number read from a document parsed by [`parse`]: `None` when `v` is not a number,
/// else the number as written.
pub fn decimal(v: &Value) -> Option<Decimal> {
    match v {
        Value::Number(n) => Decimal::parse(&n.to_string()).ok(),
        Value::String(s) => s.strip_prefix(MARK).and_then(|t| Decimal::parse(t).ok()),
        _ => None,
    }
}

/// Whether `v` is a number (plain or marked).
pub fn is_number(v: &Value) -> bool {
    decimal(v).is_some()
}

/// A decimal as a JSON value for output: a plain number when `f64` prints it back exactly
/// as written, else a marker that [`to_string`] writes as the number.
pub fn number(d: &Decimal) -> Value {
    let t = d.as_str();
    if let Ok(i) = t.parse::<i64>() {
        return Value::Number(i.into());
    }
    if let Some(n) = d.as_f64().and_then(serde_json::Number::from_f64)
        && crate::canonical::js_number(n.as_f64().unwrap_or(f64::NAN)) == t
    {
        return Value::Number(n);
    }
    Value::String(format!("{MARK}{t}"))
}

/// Compact JSON text of `v`, markers written as the numbers they stand for.
pub fn to_string(v: &Value) -> String {
    unmark_text(serde_json::to_string(v).expect("JSON values serialize"))
}

/// Indented JSON text of `v`, markers written as the numbers they stand for.
pub fn to_string_pretty(v: &Value) -> String {
    unmark_text(serde_json::to_string_pretty(v).expect("JSON values serialize"))
}

fn unmark_text(s: String) -> String {
    const PAT: &str = "\"\\u0000#";
    if !s.contains(PAT) {
        return s;
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s.as_str();
    while let Some(at) = rest.find(PAT) {
        out.push_str(&rest[..at]);
        let after = &rest[at + PAT.len()..];
        match after.find('"') {
            Some(end) if is_json_number(&after.as_bytes()[..end]) => {
                out.push_str(&after[..end]);
                rest = &after[end + 1..];
            }
            _ => {
                out.push_str(PAT);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Replaces markers by plain (`f64`) numbers, for a consumer that serializes `v` itself.
pub fn unmark(v: &mut Value) {
    match v {
        Value::String(s) => {
            if let Some(n) = s
                .strip_prefix(MARK)
                .and_then(|t| t.parse::<f64>().ok())
                .and_then(serde_json::Number::from_f64)
            {
                *v = Value::Number(n);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(unmark),
        Value::Object(m) => m.values_mut().for_each(unmark),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_keep_their_text_through_parse_and_write() {
        let input = "\u{feff}{\"a\":1.20,\"b\":[97.45878396789,-0.5e-3,12,12345678901234567890],\"c\":\"1.5 \\\" 2.5\",\"d\":0.1}";
        let v = parse(input.as_bytes()).unwrap();
        assert_eq!(decimal(&v["a"]).unwrap().as_str(), "1.20");
        assert_eq!(decimal(&v["b"][0]).unwrap().as_str(), "97.45878396789");
        assert_eq!(decimal(&v["b"][2]).unwrap().as_str(), "12");
        assert_eq!(v["c"], "1.5 \" 2.5");
        let out = to_string(&v);
        assert_eq!(
            out,
            "{\"a\":1.20,\"b\":[97.45878396789,-0.5e-3,12,12345678901234567890],\"c\":\"1.5 \\\" 2.5\",\"d\":0.1}"
        );
        // Plain numbers where f64 writes them back exactly; markers only where needed.
        assert_eq!(
            number(&Decimal::parse("0.1").unwrap()),
            serde_json::json!(0.1)
        );
        assert!(number(&Decimal::parse("1.20").unwrap()).is_string());
        let mut w = serde_json::json!({ "x": number(&Decimal::parse("1.20").unwrap()) });
        unmark(&mut w);
        assert_eq!(w, serde_json::json!({ "x": 1.2 }));
    }
}
