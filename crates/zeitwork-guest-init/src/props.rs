//! Property tests of the configuration disk and the console protocol: the
//! host and the guest read each other's bytes, so neither reader may panic
//! on anything, and what one side writes the other reads back unchanged.

use proptest::prelude::*;

use super::*;

fn config() -> impl Strategy<Value = GuestConfig> {
    let ip = any::<[u8; 4]>().prop_map(Ipv4Addr::from);
    (
        (prop::collection::vec(any::<String>(), 1..4), prop::collection::vec(any::<String>(), 0..4)),
        (any::<String>(), any::<u32>(), any::<u32>(), any::<String>(), prop::collection::vec(any::<String>(), 0..3)),
        (ip.clone(), 0u8..=32, ip.clone(), prop::collection::vec(ip, 0..3), any::<u32>()),
    )
        .prop_map(
            |((args, env), (cwd, uid, gid, hostname, search), (address, prefix, gateway, dns, overlay_mib))| {
                GuestConfig { args, env, cwd, uid, gid, hostname, address, prefix, gateway, dns, search, overlay_mib }
            },
        )
}

/// Text that may show up on a serial console: mostly printable, some
/// control characters and markers.
fn console_text() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            4 => any::<char>().prop_map(String::from),
            1 => prop::sample::select(vec![MARK, STDOUT, STDERR, EXIT, FAILED, STARTED, "\r", "\n", " ", "z", "w>"])
                .prop_map(str::to_owned),
        ],
        0..24,
    )
    .prop_map(|parts| parts.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn decoding_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..256), magic in any::<bool>()) {
        let disk = if magic { [MAGIC, &bytes].concat() } else { bytes };
        let _ = GuestConfig::decode(&disk);
    }

    #[test]
    fn decoding_mutated_disks_never_panics(c in config(), at in any::<prop::sample::Index>(), b in any::<u8>()) {
        let mut disk = c.encode();
        let i = at.index(disk.len());
        disk[i] = b;
        let _ = GuestConfig::decode(&disk);
    }

    #[test]
    fn what_the_host_writes_the_guest_reads(c in config(), padding in 0usize..64) {
        let mut disk = c.encode();
        disk.resize(disk.len() + padding, 0);
        prop_assert_eq!(GuestConfig::decode(&disk), Ok(c));
    }

    #[test]
    fn a_disk_cut_before_its_end_line_is_refused(c in config(), at in any::<prop::sample::Index>()) {
        let disk = c.encode();
        let end_line = disk.len() - b"end\n".len();
        let cut = at.index(end_line);
        prop_assert!(GuestConfig::decode(&disk[..cut]).is_err());
    }

    #[test]
    fn classifying_console_lines_never_panics(line in console_text()) {
        let _ = parse_console_line(&line);
    }

    #[test]
    fn the_inits_lines_are_read_back(
        kernel in console_text().prop_filter("no marker", |k| !k.contains(MARK)),
        text in console_text().prop_map(|t| t.trim_end_matches(['\r', '\n']).to_owned()),
        code in any::<i32>(),
        ending in prop::sample::select(vec!["", "\n", "\r\n"]),
    ) {
        let cases = [
            (format!("{STDOUT}{text}"), ConsoleLine::Stdout(&text)),
            (format!("{STDERR}{text}"), ConsoleLine::Stderr(&text)),
            (format!("{FAILED}{text}"), ConsoleLine::Failed(&text)),
            (format!("{EXIT}{code}"), ConsoleLine::Exit(code)),
            (STARTED.to_owned(), ConsoleLine::Started),
        ];
        for (marked, want) in cases {
            let line = format!("{kernel}{marked}{ending}");
            prop_assert_eq!(parse_console_line(&line), want);
        }
    }
}
