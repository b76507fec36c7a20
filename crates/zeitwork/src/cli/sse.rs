//! An incremental reader of Server-Sent Events (`text/event-stream`, as the
//! HTML standard defines it): bytes in as the network hands them over, whole
//! events out. Lines are decoded only once complete, so a character split
//! across two chunks arrives whole; a blank line ends an event and resets
//! its name; several `data:` lines make one event.

/// One event: its name (`message` when it gave none) and its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SseEvent {
    pub name: String,
    pub data: String,
}

#[derive(Debug, Default)]
pub(crate) struct SseParser {
    line: Vec<u8>,
    /// The last byte ended a line with CR; an LF right after it belongs to it.
    after_cr: bool,
    started: bool,
    name: String,
    data: String,
}

impl SseParser {
    /// Consumes `bytes`; events they complete are pushed onto `out`.
    pub(crate) fn feed(&mut self, bytes: &[u8], out: &mut Vec<SseEvent>) {
        for &b in bytes {
            if std::mem::take(&mut self.after_cr) && b == b'\n' {
                continue;
            }
            match b {
                b'\r' | b'\n' => {
                    self.after_cr = b == b'\r';
                    let line = std::mem::take(&mut self.line);
                    self.line_ended(&line, out);
                }
                _ => self.line.push(b),
            }
        }
    }

    fn line_ended(&mut self, raw: &[u8], out: &mut Vec<SseEvent>) {
        let mut line = String::from_utf8_lossy(raw);
        if !std::mem::replace(&mut self.started, true) {
            if let Some(rest) = line.strip_prefix('\u{feff}') {
                line = rest.to_owned().into();
            }
        }
        if line.is_empty() {
            let name = std::mem::take(&mut self.name);
            let mut data = std::mem::take(&mut self.data);
            if !data.is_empty() {
                data.pop();
                let name = if name.is_empty() { "message".to_owned() } else { name };
                out.push(SseEvent { name, data });
            }
            return;
        }
        if line.starts_with(':') {
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (&*line, ""),
        };
        match field {
            "event" => self.name = value.to_owned(),
            "data" => {
                self.data.push_str(value);
                self.data.push('\n');
            }
            _ => {} // id and retry mean nothing to a reader that does not reconnect
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(chunks: &[&[u8]]) -> Vec<SseEvent> {
        let mut p = SseParser::default();
        let mut out = Vec::new();
        for c in chunks {
            p.feed(c, &mut out);
        }
        out
    }

    fn ev(name: &str, data: &str) -> SseEvent {
        SseEvent { name: name.into(), data: data.into() }
    }

    #[test]
    fn events_end_at_blank_lines_and_take_their_name() {
        let got = events(&[b"event: deployment\ndata: {\"a\":1}\n\ndata: plain\n\n"]);
        assert_eq!(got, [ev("deployment", "{\"a\":1}"), ev("message", "plain")], "the name does not carry over");
    }

    #[test]
    fn a_character_split_across_chunks_arrives_whole() {
        let text = "data: grüße → 東京\n\n".as_bytes();
        for cut in 0..text.len() {
            assert_eq!(events(&[&text[..cut], &text[cut..]]), [ev("message", "grüße → 東京")], "cut at {cut}");
        }
    }

    #[test]
    fn byte_by_byte_reads_as_whole() {
        let text = b"event: x\r\ndata: 1\r\ndata:2\r\n\r\n: keep-alive\n\nevent: lagged\rdata: 3 dropped\r\r";
        let whole = events(&[text]);
        assert_eq!(whole, [ev("x", "1\n2"), ev("lagged", "3 dropped")]);
        let pieces: Vec<&[u8]> = text.chunks(1).collect();
        assert_eq!(events(&pieces), whole);
    }

    #[test]
    fn comments_unknown_fields_and_events_without_data_give_nothing() {
        assert_eq!(events(&[b": ping\n\nid: 7\nretry: 10\n\nevent: empty\n\n"]), []);
        assert_eq!(events(&[b"event: y\n\ndata\n\n"]), [ev("message", "")], "a blank line forgets the name");
        assert_eq!(events(&[b"data: unfinished\n"]), [], "no event until its blank line");
        assert_eq!(events(&["\u{feff}data: bom\n\n".as_bytes()]), [ev("message", "bom")]);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        /// Events as a server writes them, with the line ending it chose.
        fn encode(events: &[(String, String)], ending: &str) -> Vec<u8> {
            let mut out = String::new();
            for (name, data) in events {
                if !name.is_empty() {
                    out.push_str(&format!("event: {name}{ending}"));
                }
                for line in data.split('\n') {
                    out.push_str(&format!("data: {line}{ending}"));
                }
                out.push_str(&format!(": comment{ending}{ending}"));
            }
            out.into_bytes()
        }

        fn pieces(bytes: &[u8], cuts: &[prop::sample::Index]) -> Vec<Vec<u8>> {
            let mut at: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
            at.extend([0, bytes.len()]);
            at.sort();
            at.windows(2).map(|w| bytes[w[0]..w[1]].to_vec()).collect()
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn any_bytes_in_any_pieces_read_as_whole(
                bytes in prop::collection::vec(prop_oneof![any::<u8>(), Just(b'\n'), Just(b'\r'), Just(b':')], 0..200),
                cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
            ) {
                let split = pieces(&bytes, &cuts);
                let split: Vec<&[u8]> = split.iter().map(Vec::as_slice).collect();
                prop_assert_eq!(events(&split), events(&[&bytes]));
            }

            #[test]
            fn what_a_server_writes_reads_back(
                sent in prop::collection::vec(("[a-z]{0,8}", "[^\r\n]{0,12}(\n[^\r\n]{0,12}){0,2}"), 0..5),
                ending in prop::sample::select(vec!["\n", "\r\n", "\r"]),
                cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
            ) {
                let bytes = encode(&sent, ending);
                let split = pieces(&bytes, &cuts);
                let split: Vec<&[u8]> = split.iter().map(Vec::as_slice).collect();
                let want: Vec<SseEvent> = sent
                    .iter()
                    .map(|(n, d)| ev(if n.is_empty() { "message" } else { n }, d))
                    .collect();
                prop_assert_eq!(events(&split), want);
            }
        }
    }
}
