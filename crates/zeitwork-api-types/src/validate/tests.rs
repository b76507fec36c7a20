#[test]
fn tunnel_keys_and_endpoints() {
    // A key `wg genkey | wg pubkey` printed.
    wireguard_key("k", "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=").unwrap();
    for bad in [
        "",
        "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw",
        "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykx=",
        "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8yk%=",
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
    ] {
        assert_eq!(wireguard_key("tunnel.public_key", bad).unwrap_err().field, "tunnel.public_key", "{bad}");
    }
    tunnel_endpoint("e", "10.0.0.5:51820").unwrap();
    for bad in ["10.0.0.5", "10.0.0.5:0", "0.0.0.0:51820", "224.0.0.1:51820", "[::1]:51820", "node:51820"] {
        assert!(tunnel_endpoint("tunnel.endpoint", bad).is_err(), "{bad}");
    }
}

#[test]
fn countries_by_code_or_name() {
    for (given, code) in [
        ("US", "US"),
        ("de", "DE"),
        ("ZZ", "ZZ"),
        ("USA", "US"),
        ("United States", "US"),
        ("united states of america", "US"),
        ("Germany", "DE"),
        ("United Kingdom", "GB"),
        ("The Netherlands", "NL"),
        ("Japan", "JP"),
    ] {
        assert_eq!(country_code(given).as_deref(), Some(code), "{given}");
        country("country", given).unwrap();
    }
    for bad in ["", "X1", "Atlantis", "U$", "1234", &"a".repeat(200)] {
        assert_eq!(country_code(bad), None, "{bad}");
        let e = country("country", bad).unwrap_err();
        assert_eq!(e.field, "country");
    }
}
use super::*;

#[test]
fn dns_labels() {
    for ok in ["a", "acme", "us-east", "a1", "1a", &"a".repeat(63)] {
        assert!(dns_label("name", ok).is_ok(), "{ok}");
    }
    for bad in ["", "-a", "a-", "A", "a_b", "a.b", "é", &"a".repeat(64), "a b"] {
        let e = dns_label("name", bad).unwrap_err();
        assert_eq!(e.field, "name", "{bad}");
    }
}

#[test]
fn image_references() {
    for ok in [
        "nginx",
        "nginx:1.25",
        "library/nginx:latest",
        "ghcr.io/acme/web:sha-abc123",
        "localhost:5000/app",
        "127.0.0.1:5000/a/b:c",
        "registry.example.com/a@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
    ] {
        assert!(image_reference("image", ok).is_ok(), "{ok}");
    }
    for bad in ["", "UPPER/case", "a:", "a@sha256:12", "a//b", ":tag", "a b", "-a"] {
        assert!(image_reference("image", bad).is_err(), "{bad}");
    }
}

#[test]
fn domains_and_repos() {
    assert!(domain_name("name", "www.example.com").is_ok());
    assert!(domain_name("name", "example").is_err());
    assert!(domain_name("name", "ex..com").is_err());
    assert!(domain_name("name", "1.2.3.4").is_err());
    assert!(github_repo("r", "acme/webapp").is_ok());
    assert!(github_repo("r", "acme").is_err());
    assert!(github_repo("r", "a/b/c").is_err());
    assert!(branch("b", "feature/x").is_ok());
    assert!(branch("b", "a..b").is_err());
    assert!(env_key("k", "DATABASE_URL").is_ok());
    assert!(env_key("k", "1X").is_err());
    assert!(env_key("k", "ZEITWORK_X").is_err());
}

#[test]
fn resource_ranges() {
    assert!(resources("resources", &Resources { vcpu: 1, memory: 128 }).is_ok());
    assert!(resources("resources", &Resources { vcpu: 32, memory: 65536 }).is_ok());
    assert_eq!(resources("resources", &Resources { vcpu: 0, memory: 256 }).unwrap_err().field, "resources.vcpu");
    assert_eq!(resources("resources", &Resources { vcpu: 33, memory: 256 }).unwrap_err().field, "resources.vcpu");
    assert_eq!(resources("resources", &Resources { vcpu: 1, memory: 127 }).unwrap_err().field, "resources.memory");
    assert_eq!(resources("resources", &Resources { vcpu: 1, memory: 65537 }).unwrap_err().field, "resources.memory");
}

/// Egress allow-lists.
mod egress {
    use crate::validate::{EgressEntry, EgressRule};

    #[test]
    fn egress_entries_are_networks_or_host_names() {
        let host = |name: &str, port| EgressEntry::Host { name: name.into(), port };
        assert_eq!(EgressEntry::parse("api.example.com").unwrap(), host("api.example.com", None));
        assert_eq!(EgressEntry::parse("API.Example.com.:443").unwrap(), host("api.example.com", Some(443)));
        assert!(matches!(EgressEntry::parse("198.51.100.7:443").unwrap(), EgressEntry::Net(r) if r.port == Some(443)));
        for bad in [
            "api.example.com:0",
            "api.example.com:65536",
            "api.example.com:x",
            "-api.example.com",
            "api..example.com",
            "localhost",
            "web.internal",
            "exa mple.com",
            "1.2.3.4.5",
            "203.0.113.1/24",
            "",
        ] {
            assert!(EgressEntry::parse(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn egress_rules_parse_networks_and_ports() {
        let r = EgressRule::parse("203.0.113.0/24").unwrap();
        assert_eq!((r.addr.to_string(), r.prefix_len, r.port), ("203.0.113.0".into(), 24, None));
        let r = EgressRule::parse("198.51.100.7:443").unwrap();
        assert_eq!((r.prefix_len, r.port), (32, Some(443)));
        assert_eq!(EgressRule::parse("192.0.2.0/28:5432").unwrap().port, Some(5432));
        for bad in ["example.com:443", "203.0.113.1/24", "10.0.0.0/33", "1.2.3.4:0", "1.2.3.4:x", "", "::1"] {
            assert!(EgressRule::parse(bad).is_err(), "{bad} was accepted as a network");
        }
    }
}
