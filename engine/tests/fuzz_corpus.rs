//! Replays the `rewrite` fuzz corpus and regressions
//! (`fuzz/{corpus,regressions}/rewrite/`) through the prepared-statement
//! rewriter check the fuzz target runs (`engine::fuzzcheck::rewriter`), on
//! stable, in `cargo test`. The message-name half of the target is replayed
//! by `wire/tests/fuzz_corpus.rs`.

use std::path::Path;

#[test]
fn replay_rewrite() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut n = 0;
    for kind in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(fuzz.join(kind).join("rewrite")) else {
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
            let r = std::panic::catch_unwind(|| engine::fuzzcheck::rewriter(&data));
            assert!(r.is_ok(), "rewrite: {} fails its check", path.display());
            n += 1;
        }
    }
    assert!(n >= 5, "expected the rewrite corpus, found {n} files");
}
