//! Tests of the config file: defaults round-trip, the ConfigMap's keys, layering under flags,
//! and bad input as one error line.

use std::collections::BTreeSet;

use super::*;

/// Dotted paths of every key of a TOML document.
fn keys(text: &str) -> BTreeSet<String> {
    fn walk(prefix: &str, t: &toml::Table, out: &mut BTreeSet<String>) {
        for (k, v) in t {
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v {
                toml::Value::Table(inner) => walk(&path, inner, out),
                _ => {
                    out.insert(path);
                }
            }
        }
    }
    let table: toml::Table = toml::from_str(text).unwrap();
    let mut out = BTreeSet::new();
    walk("", &table, &mut out);
    out
}

/// The `config.toml` block of the ConfigMap, de-indented.
fn configmap_toml() -> String {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kustomize/base/configmap.yaml");
    let yaml = std::fs::read_to_string(&path).unwrap();
    let mut lines = yaml.lines().skip_while(|l| l.trim() != "config.toml: |");
    assert!(
        lines.next().is_some(),
        "no config.toml block in {}",
        path.display()
    );
    let mut out = String::new();
    for l in lines {
        if !l.trim().is_empty() && !l.starts_with("    ") {
            break;
        }
        out.push_str(l.strip_prefix("    ").unwrap_or(""));
        out.push('\n');
    }
    out
}

#[test]
fn print_default_round_trips() {
    let text = print_default();
    assert_eq!(Config::parse(&text).unwrap(), Config::default());
    assert_eq!(Config::parse("").unwrap(), Config::default());
    assert_eq!(load(None).unwrap(), Config::default());
}

#[test]
fn configmap_has_exactly_the_default_keys() {
    let cm = configmap_toml();
    assert_eq!(keys(&cm), keys(&print_default()));
    let cfg = Config::parse(&cm).unwrap();
    assert_eq!(cfg.listen, DEFAULT_LISTEN);
}

#[test]
fn file_values_and_flags_layer() {
    let mut cfg = Config::parse(
        r#"
        listen = "127.0.0.1:9999"
        ttl = "90s"
        top_k = 3
        [select]
        comm = ["^nginx$"]
        exclude_comm = ["^sh$"]
        [go]
        malloc = true
        "#,
    )
    .unwrap();
    assert_eq!(cfg.listen, "127.0.0.1:9999".parse().unwrap());
    assert_eq!(cfg.ttl, Duration::from_secs(90));
    assert_eq!(cfg.top_k, 3);
    assert!(cfg.go.malloc && cfg.go.growth);
    assert_eq!(cfg.capacity, Capacity::default());
    assert_eq!(cfg.web_config, None);
    assert_eq!(cfg.http, Http::default());
    cfg.apply(Overrides {
        top_k: Some(7),
        comm: vec!["^redis".into()],
        pprof: Some(true),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(cfg.top_k, 7);
    assert_eq!(cfg.select.comm, ["^redis"]);
    assert_eq!(
        cfg.select.exclude_comm,
        ["^sh$"],
        "an empty flag list keeps the file's"
    );
    assert!(cfg.pprof.enabled);
    assert_eq!(cfg.listen, "127.0.0.1:9999".parse().unwrap());
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    // (file, the one-line error as `main` prints it, the pointer under it)
    let cases = [
        (
            "top_kk = 3",
            "config file <text>, line 1: unknown field `top_kk`, expected one of",
            "  |\n1 | top_kk = 3\n  | ^^^^^^",
        ),
        (
            "ttl = \"5 parsecs\"",
            "config file <text>, line 1, key ttl: unknown unit \" parsecs\" in \"5 parsecs\"",
            "  |\n1 | ttl = \"5 parsecs\"\n  |       ^^^^^^^^^^^",
        ),
        (
            "ttl = \"0s\"",
            "config file <text>, line 1, key ttl: must be at least 1s: the series of an \
             exited process must outlive a scrape",
            "^^^^",
        ),
        (
            "ttl = 5",
            "key ttl: invalid type: integer `5`, expected a string",
            "^",
        ),
        (
            "listen = \"nowhere\"",
            "key listen: \"nowhere\" has no port: expected HOST:PORT",
            "^",
        ),
        (
            "# comment\n[select]\nexe = []\ncomm = [\"ok\", \"(\"]",
            "config file <text>, line 4, key select.comm: [1] \"(\": not a regular \
             expression: unclosed group",
            "  |\n4 | comm = [\"ok\", \"(\"]\n  |        ^^^^^^^^^^^",
        ),
        (
            "[capacity]\nmax_live = 0",
            "line 2, key capacity.max_live: must be at least 1: a kernel map needs at least \
             one entry",
            "^",
        ),
        (
            "[capacity]\nmax_live = -1",
            "key capacity.max_live: -1 is negative",
            "^",
        ),
        (
            "[capacity]\nmax_stacks = 4000000000",
            "key capacity.max_stacks: must be at most 524288: the kernel reserves memory",
            "^",
        ),
        (
            "top_k = 0",
            "key top_k: must be at least 1: 0 would give no call site",
            "^",
        ),
        (
            "top_k = ",
            "line 1, key top_k: string values must be quoted",
            "^",
        ),
        (
            "mode = \"cheap\"",
            "key mode: unknown mode `cheap`: expected one of full, stacks-off",
            "^",
        ),
        // The benchmark's empty programs are not a way to run the agent.
        ("mode = \"floor\"", "unknown mode `floor`", "^"),
        (
            "unwind = \"frames\"",
            "key unwind: unknown unwinder \"frames\" (fp, dwarf, auto)",
            "^",
        ),
    ];
    for (text, want, pointer) in cases {
        let err = Config::parse(text).unwrap_err();
        let line = err.to_string();
        assert!(!line.contains('\n'), "{text:?}: one line: {line}");
        assert!(line.contains(want), "{text:?}: {line}\nwant {want}");
        let p = err.pointer().unwrap();
        assert!(
            p.contains(pointer),
            "{text:?}: pointer\n{p}\nwant\n{pointer}"
        );
    }
    let err = load(Some(Path::new("/nonexistent/allocwatch.toml"))).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }), "{err}");
    assert!(err.pointer().is_none());
    assert_eq!(
        Config::parse("max_site_series = 0")
            .unwrap()
            .max_site_series,
        0,
        "0 exports no call-site series"
    );
}

#[test]
fn mode_from_file_and_flag() {
    assert_eq!(Config::default().mode, Mode::Full);
    let mut cfg = Config::parse("mode = \"count-stacks\"").unwrap();
    assert_eq!(cfg.mode, Mode::CountStacks);
    cfg.apply(Overrides::default()).unwrap();
    assert_eq!(cfg.mode, Mode::CountStacks, "no flag keeps the file's mode");
    cfg.apply(Overrides {
        mode: Some(Mode::Count),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(cfg.mode, Mode::Count);
    for m in Mode::public_names() {
        let cfg = Config::parse(&format!("mode = \"{m}\"")).unwrap();
        assert_eq!(cfg.mode.name(), m);
    }
}

#[test]
fn unwind_from_file_and_flag() {
    assert_eq!(Config::default().unwind, Unwind::Auto);
    let mut cfg = Config::parse("unwind = \"dwarf\"").unwrap();
    assert_eq!(cfg.unwind, Unwind::Dwarf);
    cfg.apply(Overrides::default()).unwrap();
    assert_eq!(cfg.unwind, Unwind::Dwarf, "no flag keeps the file's value");
    cfg.apply(Overrides {
        unwind: Some(Unwind::Fp),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(cfg.unwind, Unwind::Fp);
}

#[test]
fn sample_bytes_from_file_and_flag() {
    // Unset: Go's 512 KiB where the mode samples, 0 in count (nothing to sample).
    assert_eq!(Config::default().sample_bytes(), 512 << 10);
    let count = Config::parse("mode = \"count\"").unwrap();
    assert_eq!(count.sample_bytes(), 0);
    let mut cfg = Config::parse("sample_bytes = 4096").unwrap();
    assert_eq!(cfg.sample_bytes(), 4096);
    cfg.apply(Overrides::default()).unwrap();
    assert_eq!(cfg.sample_bytes(), 4096, "no flag keeps the file's value");
    cfg.apply(Overrides {
        sample_bytes: Some(0),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(cfg.sample_bytes(), 0);
    let e = Config::parse("sample_bytes = -1").unwrap_err().to_string();
    assert!(e.contains("must be at least 0"), "{e}");
    let e = Config::parse("sample_bytes = 1099511627777")
        .unwrap_err()
        .to_string();
    assert!(e.contains("must be at most 1099511627776"), "{e}");
}

#[test]
fn http_limits_and_web_config_from_file_and_flag() {
    let dir = std::env::temp_dir().join(format!("allocwatch-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let web = dir.join("web.yml");
    std::fs::write(&web, "").unwrap();
    let mut cfg = Config::parse(
        "[http]\nheader_timeout = \"2s\"\nidle_timeout = \"1m\"\nmax_connections = 8\n",
    )
    .unwrap();
    assert_eq!(
        cfg.http,
        Http {
            header_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(60),
            max_connections: 8,
            ..Http::default()
        }
    );
    cfg.apply(Overrides {
        web_config: Some(web.clone()),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(cfg.web_config.as_deref(), Some(web.as_path()));
    let from_file = Config::parse(&format!("web_config = \"{}\"", web.display())).unwrap();
    assert_eq!(from_file.web_config, Some(web));
    for (text, want) in [
        (
            "[http]\nheader_timeout = \"0s\"",
            "config key http.header_timeout: must be more than 0s",
        ),
        (
            "[http]\nmax_connections = 0",
            "config key http.max_connections: 0 is outside 1..=10000",
        ),
        ("[http]\nidle_timeout = 5", "invalid type"),
        (
            "web_config = \"/nonexistent/web.yml\"",
            "reading web config /nonexistent/web.yml: No such file",
        ),
    ] {
        let err = Config::parse(text).and_then(|c| c.validate()).unwrap_err();
        // As the agent prints it: the error and its causes on one line.
        let err = format!("{:#}", anyhow::Error::from(err));
        assert!(!err.contains('\n'), "{text:?}: one line: {err}");
        assert!(err.contains(want), "{text:?}: {err}\nwant {want}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn probes_from_file_and_flag() {
    let exe = std::env::current_exe().unwrap();
    let exe = exe.display();
    // This test binary's own `main`: a file and a symbol that exist.
    let c = Config::parse(&format!("probe = [\"{exe}:main:arg0 as argc\"]")).unwrap();
    assert_eq!(c.probe.len(), 1);
    assert_eq!(c.probe[0].symbol, "main");
    assert_eq!(c.probe[0].args, vec![(0, "argc".to_owned())]);
    assert_eq!(c.probe[0].to_string(), format!("{exe}:main:arg0 as argc"));
    c.validate().unwrap();
    // A flag replaces the file's list.
    let mut c = c;
    c.apply(Overrides {
        probe: vec![format!("{exe}:main").parse().unwrap()],
        ..Overrides::default()
    })
    .unwrap();
    assert!(c.probe[0].args.is_empty());
    // Syntax: refused while parsing, with the line.
    let e = Config::parse("probe = [\"/bin/true\"]")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("line 1, key probe: [0] \"/bin/true\": expected BINARY:SYMBOL"),
        "{e}"
    );
    // A symbol that names no function, a missing file, a kind's name: refused by validate.
    for (spec, says) in [
        (
            format!("{exe}:no_such_function_anywhere"),
            "no function no_such_function_anywhere",
        ),
        ("/nonexistent/x:f".to_owned(), "No such file or directory"),
        (
            format!("{exe}:malloc"),
            "is the name of a kind the agent exports already",
        ),
        (format!("{exe}:cxx_vector_grow"), "is the name of a kind"),
    ] {
        let mut c = Config::default();
        let e = c
            .apply(Overrides {
                probe: vec![spec.parse().unwrap()],
                ..Overrides::default()
            })
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("config key probe: ") && e.contains(says),
            "{spec}: {e}"
        );
    }
}
