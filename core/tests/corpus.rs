//! Every fuzz target's corpus (`fuzz/corpus/<target>/`), replayed through the target's own
//! body (`nnserve_core::fuzzing`): the invariants the fuzzer checks hold on every input
//! kept, crashes found included (their inputs are kept as regression seeds), in every
//! `make test`, without a fuzzer or a sanitizer build.

use nnserve_core::fuzzing::{corpus_dir, TARGETS};

#[test]
fn every_corpus_input_keeps_its_targets_invariants() {
    let mut replayed = 0;
    for (name, target) in TARGETS {
        let dir = corpus_dir().join(name);
        let mut inputs: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e} (each target keeps a seed corpus)", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        inputs.sort();
        assert!(!inputs.is_empty(), "{}: no seeds", dir.display());
        for input in inputs {
            let data = std::fs::read(&input).unwrap();
            let outcome = std::panic::catch_unwind(|| target(&data));
            assert!(
                outcome.is_ok(),
                "{name}: {} broke an invariant",
                input.display()
            );
            replayed += 1;
        }
    }
    println!("replayed {replayed} corpus inputs");
}
