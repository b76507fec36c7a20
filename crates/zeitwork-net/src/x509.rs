//! Just enough X.509 to read a certificate's expiry: PEM to DER (rustls'
//! reader), and the `notAfter` of the leaf (a few DER steps; no full parser
//! needed).

use rustls_pki_types::pem::{PemObject, SectionKind};

/// The DER blocks of every `label` (`CERTIFICATE`, `PRIVATE KEY`, `EC PRIVATE
/// KEY`, …) in a PEM text, in order. Blocks that do not decode are left out;
/// a label rustls does not know has none.
pub fn pem_blocks(pem: &str, label: &str) -> Vec<Vec<u8>> {
    let Ok(kind) = SectionKind::try_from(label.as_bytes()) else { return Vec::new() };
    <(SectionKind, Vec<u8>)>::pem_slice_iter(pem.as_bytes())
        .filter_map(Result::ok)
        .filter(|(k, _)| *k == kind)
        .map(|(_, der)| der)
        .collect()
}

/// One DER element: (tag, contents, rest).
fn tlv(data: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = data.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |acc, b| (acc << 8) | *b as usize);
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// `notAfter` of a DER certificate, as Unix seconds.
pub fn not_after(der: &[u8]) -> Option<i64> {
    let (0x30, cert, _) = tlv(der)? else { return None };
    let (0x30, tbs, _) = tlv(cert)? else { return None };
    let mut rest = tbs;
    // Optional [0] version.
    if rest.first() == Some(&0xa0) {
        rest = tlv(rest)?.2;
    }
    // serialNumber, signature, issuer.
    for _ in 0..3 {
        rest = tlv(rest)?.2;
    }
    let (0x30, validity, _) = tlv(rest)? else { return None };
    let (_, _, after_not_before) = tlv(validity)?;
    let (tag, time, _) = tlv(after_not_before)?;
    let text = std::str::from_utf8(time).ok()?;
    let digits = text.strip_suffix('Z')?;
    // Slicing below counts bytes: anything but ASCII digits would split a character.
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (year, rest) = match tag {
        0x17 if digits.len() == 12 => {
            let yy: i64 = digits[..2].parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &digits[2..])
        }
        0x18 if digits.len() == 14 => (digits[..4].parse().ok()?, &digits[4..]),
        _ => return None,
    };
    let n = |i: usize| rest.get(i..i + 2)?.parse::<i64>().ok();
    let (month, day, hour, min, sec) = (n(0)?, n(2)?, n(4)?, n(6)?, n(8)?);
    let date = chrono::NaiveDate::from_ymd_opt(year as i32, month as u32, day as u32)?;
    let dt = date.and_hms_opt(hour as u32, min as u32, sec as u32)?;
    Some(dt.and_utc().timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_not_after_of_generated_certificates() {
        for (y, m, d) in [(2031, 7, 4), (2049, 12, 31), (2051, 1, 2)] {
            let mut params = rcgen::CertificateParams::new(vec!["www.example.com".to_owned()]).unwrap();
            params.not_after = rcgen::date_time_ymd(y, m, d);
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            let blocks = pem_blocks(&cert.pem(), "CERTIFICATE");
            assert_eq!(blocks.len(), 1);
            let want = chrono::NaiveDate::from_ymd_opt(y, m as u32, d as u32)
                .unwrap()
                .and_hms_opt(0, 0, 0)
                .unwrap()
                .and_utc()
                .timestamp();
            assert_eq!(not_after(&blocks[0]), Some(want), "{y}-{m}-{d}");
        }
        assert_eq!(not_after(b"\x30\x03\x02\x01"), None);
        assert_eq!(not_after(&[]), None);
        assert!(pem_blocks("nonsense", "CERTIFICATE").is_empty());
    }

    #[test]
    fn pem_blocks_by_label_skipping_what_does_not_decode() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["a.example".to_owned()]).unwrap().self_signed(&key).unwrap();
        let broken = "-----BEGIN CERTIFICATE-----\n!!not base64!!\n-----END CERTIFICATE-----\n";
        let bundle = format!("{}{broken}{}", key.serialize_pem(), cert.pem());
        assert_eq!(pem_blocks(&bundle, "CERTIFICATE"), vec![cert.der().to_vec()]);
        assert_eq!(pem_blocks(&bundle, "PRIVATE KEY"), vec![key.serialize_der()]);
        assert!(pem_blocks(&bundle, "EC PRIVATE KEY").is_empty());
        assert!(pem_blocks(&bundle, "NO SUCH LABEL").is_empty());
    }
}
