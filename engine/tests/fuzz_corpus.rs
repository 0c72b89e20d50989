//! Replays the `rewrite` and `tls` fuzz corpora and regressions
//! (`fuzz/{corpus,regressions}/<target>/`) through the checks the fuzz
//! targets run (`engine::fuzzcheck::rewriter`, `engine::fuzzcheck::tls`), on
//! stable, in `cargo test`. The message-name half of the rewrite target is
//! replayed by `wire/tests/fuzz_corpus.rs`.

use std::path::Path;

#[test]
fn replay_rewrite() {
    replay("rewrite", engine::fuzzcheck::rewriter);
}

#[test]
fn replay_tls() {
    replay("tls", engine::fuzzcheck::tls);
}

fn replay(target: &str, check: fn(&[u8])) {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut n = 0;
    for kind in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(fuzz.join(kind).join(target)) else {
            continue;
        };
        for e in entries {
            let path = e.expect("readable directory").path();
            let hidden = path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'));
            if !path.is_file() || hidden {
                continue;
            }
            let data = std::fs::read(&path).expect("readable file");
            let r = std::panic::catch_unwind(|| check(&data));
            assert!(r.is_ok(), "{target}: {} fails its check", path.display());
            n += 1;
        }
    }
    assert!(n >= 5, "expected the {target} corpus, found {n} files");
}
