//! Megatron-LM indexed datasets written by an independent writer (this test, byte by byte as
//! Megatron's `IndexedDatasetBuilder` lays them out) read back as the same tokens; damaged
//! files are refused; the embedded corpus is there.

use fmoec::check::DataSource;
use fmoec::runtime::data::{builtin_text, unigram_entropy, Dataset, IndexedDataset};

/// Writes `prefix.bin` / `prefix.idx`: header `MMIDIDX\0\0`, version u64 = 1, dtype code u8,
/// sequence count u64, document count u64 (+1), lengths i32[], byte pointers i64[],
/// document indices i64[] — all little-endian.
fn write_indexed(prefix: &str, docs: &[Vec<i64>], code: u8, size: usize) {
    let mut bin = Vec::new();
    let mut lengths = Vec::new();
    let mut pointers = Vec::new();
    for d in docs {
        pointers.push(bin.len() as i64);
        lengths.push(d.len() as i32);
        for &t in d {
            match size {
                2 => bin.extend_from_slice(&(t as u16).to_le_bytes()),
                4 => bin.extend_from_slice(&(t as i32).to_le_bytes()),
                _ => unreachable!(),
            }
        }
    }
    let mut idx = b"MMIDIDX\x00\x00".to_vec();
    idx.extend_from_slice(&1u64.to_le_bytes());
    idx.push(code);
    idx.extend_from_slice(&(docs.len() as u64).to_le_bytes());
    idx.extend_from_slice(&(docs.len() as u64 + 1).to_le_bytes());
    for l in &lengths {
        idx.extend_from_slice(&l.to_le_bytes());
    }
    for p in &pointers {
        idx.extend_from_slice(&p.to_le_bytes());
    }
    for i in 0..=docs.len() as i64 {
        idx.extend_from_slice(&i.to_le_bytes());
    }
    std::fs::write(format!("{prefix}.bin"), bin).unwrap();
    std::fs::write(format!("{prefix}.idx"), idx).unwrap();
}

fn docs() -> Vec<Vec<i64>> {
    (0..7)
        .map(|d| {
            (0..(50 + 37 * d))
                .map(|i| (i * 7919 + d * 31) % 50000)
                .collect()
        })
        .collect()
}

#[test]
fn indexed_dataset_round_trips_uint16_and_int32() {
    let dir = tempfile::tempdir().unwrap();
    for (code, size) in [(8u8, 2usize), (4, 4)] {
        let prefix = dir
            .path()
            .join(format!("corpus{code}"))
            .display()
            .to_string();
        write_indexed(&prefix, &docs(), code, size);
        let ds = IndexedDataset::open(&prefix).unwrap();
        assert_eq!(ds.sizes.len(), 7);
        assert_eq!(ds.doc_idx, (0..=7).collect::<Vec<i64>>());
        for (i, d) in docs().iter().enumerate() {
            assert_eq!(&ds.sequence(i).unwrap(), d);
        }
        assert_eq!(ds.stream().unwrap(), docs().concat());
        let data = Dataset::load(&DataSource::Megatron(prefix.clone()), 50304).unwrap();
        assert_eq!(data.len(), docs().concat().len());
        // training windows are read from the map: every window is a slice of the stream
        let stream = docs().concat();
        let batch = data
            .batch(false, &[1, 2, 3], 4, 33, tch::Device::Cpu)
            .unwrap();
        for r in 0..4 {
            let row = Vec::<i64>::try_from(batch.get(r)).unwrap();
            assert!(
                stream.windows(33).any(|w| w == row.as_slice()),
                "row {r} is not in the stream"
            );
        }
        // token ids beyond the vocabulary are an error, not a crash
        let err = Dataset::load(&DataSource::Megatron(prefix), 256)
            .err()
            .expect("refused");
        assert!(
            format!("{err:#}").contains("outside the model's vocabulary"),
            "{err:#}"
        );
    }
}

#[test]
fn damaged_indexed_datasets_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("c").display().to_string();
    write_indexed(&prefix, &docs(), 8, 2);
    let bin = std::fs::read(format!("{prefix}.bin")).unwrap();
    std::fs::write(format!("{prefix}.bin"), &bin[..bin.len() - 10]).unwrap();
    let err = IndexedDataset::open(&prefix).err().expect("refused");
    assert!(format!("{err:#}").contains("truncated"), "{err:#}");
    let idx = std::fs::read(format!("{prefix}.idx")).unwrap();
    std::fs::write(format!("{prefix}.idx"), &idx[..40]).unwrap();
    assert!(IndexedDataset::open(&prefix).is_err());
    std::fs::write(format!("{prefix}.idx"), b"not an index at all").unwrap();
    let err = IndexedDataset::open(&prefix).err().expect("refused");
    assert!(format!("{err:#}").contains("MMIDIDX"), "{err:#}");
}

#[test]
fn the_embedded_corpus_is_a_megabyte_of_english() {
    let text = builtin_text("shakespeare").unwrap();
    assert!(text.len() > 1_000_000);
    assert!(String::from_utf8_lossy(&text).contains("To be, or not to be"));
    let tokens: Vec<i64> = text.iter().map(|&b| b as i64).collect();
    let h = unigram_entropy(&tokens);
    assert!(h > 2.5 && h < 3.5, "unigram entropy {h}");
    assert!(builtin_text("nope").is_err());
}
