//! Nothing here: the benches live in `benches/hot_path.rs` (`cargo bench -p supavisor-benches`).
