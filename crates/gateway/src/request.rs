//! An HTTP request as message headers: plain data, no I/O.
//!
//! - `http.method`, `http.query` (the raw query), `http.request-id`;
//! - `query.<name>`: the percent-decoded value of a query parameter; a name given more than
//!   once carries a JSON array of its values, in order;
//! - `header.<name>`: a header's value (lower-case name); a header given more than once
//!   carries its values joined by `, `, as HTTP defines for list headers.

use std::collections::BTreeMap;

/// The longest request id taken from a client; a longer or odd one is replaced.
const MAX_REQUEST_ID: usize = 128;

/// The request id to use: the client's `X-Request-Id` when it is sensible (1 to 128 visible
/// ASCII characters), else a new one.
pub fn request_id(given: Option<&str>) -> String {
    match given {
        Some(id)
            if !id.is_empty()
                && id.len() <= MAX_REQUEST_ID
                && id.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            id.to_owned()
        }
        _ => rylm_message::new_id(),
    }
}

/// Decodes `%XX` escapes and `+` (a space, in a query); a malformed escape is kept as it is.
pub fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok());
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(byte) => {
                        out.push(byte);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The `query.<name>` headers of a raw query.
pub fn query_headers(query: &str, headers: &mut BTreeMap<String, String>) {
    let mut values: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        values
            .entry(percent_decode(name))
            .or_default()
            .push(percent_decode(value));
    }
    for (name, mut list) in values {
        let value = if list.len() == 1 {
            list.pop().unwrap_or_default()
        } else {
            serde_json::Value::from(list).to_string()
        };
        headers.insert(format!("query.{name}"), value);
    }
}

/// The `header.<name>` headers of an HTTP request's headers.
pub fn header_headers(from: &hyper::HeaderMap, headers: &mut BTreeMap<String, String>) {
    for name in from.keys() {
        let values: Vec<&str> = from
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        if !values.is_empty() {
            headers.insert(format!("header.{}", name.as_str()), values.join(", "));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_decoded_and_repeated_names_kept_as_lists() {
        let mut headers = BTreeMap::new();
        query_headers(
            "a=1&tag=x&tag=y%20z&q=caf%C3%A9+au+lait&bad=%zz&flag",
            &mut headers,
        );
        assert_eq!(headers["query.a"], "1");
        assert_eq!(headers["query.tag"], r#"["x","y z"]"#);
        assert_eq!(headers["query.q"], "café au lait");
        assert_eq!(headers["query.bad"], "%zz");
        assert_eq!(headers["query.flag"], "");
    }

    #[test]
    fn repeated_headers_are_joined_and_request_ids_checked() {
        let mut from = hyper::HeaderMap::new();
        from.append("accept", "text/plain".parse().expect("value"));
        from.append("accept", "application/json".parse().expect("value"));
        let mut headers = BTreeMap::new();
        header_headers(&from, &mut headers);
        assert_eq!(headers["header.accept"], "text/plain, application/json");
        assert_eq!(request_id(Some("abc-123")), "abc-123");
        assert_ne!(request_id(Some("has space")), "has space");
        assert_eq!(request_id(None).len(), 36);
        assert_eq!(request_id(Some(&"x".repeat(129))).len(), 36);
    }
}
