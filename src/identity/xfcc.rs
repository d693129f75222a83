//! Envoy's `x-forwarded-client-cert` header: what a mesh sidecar that
//! terminated mTLS learned about the client certificate. Format:
//! `By=...;URI=spiffe://...;DNS=...;Subject="CN=..."`, elements separated by
//! `,`, values optionally double-quoted (`\"` inside quotes).
//!
//! Hand-written: no maintained crate parses this header, and the grammar is
//! a dozen lines.

/// The identity named by the element the nearest proxy added (the last one):
/// its URI, else its first DNS name, else the CN of its Subject.
pub(super) fn identity(header: &str) -> Result<Option<String>, MalformedXfcc> {
    let elements = split_unquoted(header, ',')?;
    let Some(last) = elements.last() else {
        return Ok(None);
    };
    let (mut uri, mut dns, mut subject) = (None, None, None);
    for pair in split_unquoted(last, ';')? {
        let (key, value) = pair.split_once('=').ok_or(MalformedXfcc)?;
        let value = unquote(value.trim())?;
        match key.trim().to_ascii_lowercase().as_str() {
            "uri" => uri = uri.or(Some(value)),
            "dns" => dns = dns.or(Some(value)),
            "subject" => subject = subject.or(Some(value)),
            _ => {}
        }
    }
    let common_name = subject.as_deref().and_then(common_name);
    Ok(uri.or(dns).or(common_name).filter(|id| !id.is_empty()))
}

/// The header could not be parsed; a sidecar never sends that.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed x-forwarded-client-cert header")]
pub struct MalformedXfcc;

/// Splits on `separator` outside double quotes.
fn split_unquoted(text: &str, separator: char) -> Result<Vec<&str>, MalformedXfcc> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (at, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == separator && !quoted => {
                parts.push(&text[start..at]);
                start = at + c.len_utf8();
            }
            _ => {}
        }
    }
    if quoted || escaped {
        return Err(MalformedXfcc);
    }
    parts.push(&text[start..]);
    Ok(parts.into_iter().filter(|p| !p.trim().is_empty()).collect())
}

fn unquote(value: &str) -> Result<String, MalformedXfcc> {
    let Some(inner) = value.strip_prefix('"') else {
        return Ok(value.to_owned());
    };
    let inner = inner.strip_suffix('"').ok_or(MalformedXfcc)?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        out.push(if c == '\\' {
            chars.next().ok_or(MalformedXfcc)?
        } else {
            c
        });
    }
    Ok(out)
}

/// `CN=svc,OU=x,O=y` → `svc`. Escaped commas inside a CN are not supported:
/// service identities do not use them.
fn common_name(subject: &str) -> Option<String> {
    subject
        .split(',')
        .find_map(|rdn| rdn.trim().strip_prefix("CN="))
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn the_uri_of_the_last_element_wins() {
        let header = r#"By=spiffe://mesh/ns/a/sa/gw;URI=spiffe://mesh/ns/a/sa/old,By=spiffe://mesh/ns/s/sa/session;Hash=abc;Subject="CN=billing,O=Example";URI=spiffe://mesh/ns/billing/sa/api;DNS=billing.svc"#;
        assert_eq!(
            identity(header).expect("parses").as_deref(),
            Some("spiffe://mesh/ns/billing/sa/api")
        );
    }

    #[test]
    fn dns_then_subject_common_name_are_fallbacks() {
        assert_eq!(
            identity("Hash=1;DNS=a.example;DNS=b.example").expect("parses"),
            Some("a.example".into())
        );
        assert_eq!(
            identity(r#"Hash=1;Subject="CN=svc \"x\",O=Org""#).expect("parses"),
            Some(r#"svc "x""#.into())
        );
        assert_eq!(identity("Hash=1").expect("parses"), None);
        assert_eq!(identity("").expect("parses"), None);
    }

    #[test]
    fn broken_quoting_is_malformed() {
        for header in [r#"URI="spiffe://x"#, "URI", r#"Subject="CN=a\"#] {
            assert_eq!(identity(header), Err(MalformedXfcc), "{header}");
        }
    }

    proptest! {
        #[test]
        fn any_header_parses_or_is_refused_without_panicking(header in ".{0,300}") {
            let _ = identity(&header);
        }
    }
}
