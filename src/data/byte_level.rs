//! A fast path for GPT-2-style byte-level BPE: the same ids as the `tokenizers` crate's
//! pipeline (its `ByteLevel` pre-tokenizer with GPT-2's pattern, then the BPE model), without
//! building an `Encoding` per text, and with a per-thread cache of the ids of each piece.
//!
//! GPT-2's pattern `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
//! is scanned by hand ([`pieces`]) with the letter, number and white-space classes of
//! `regex-syntax`, the tables the crate's regex engine (fancy-regex) matches with. Texts that
//! hold an added token (`<|endoftext|>`, ...) go through the crate's own pipeline, which
//! splits them off first. Knows nothing about datasets.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::OnceLock;

use anyhow::Result;
use regex_syntax::hir::{Class, HirKind};
use tokenizers::models::bpe::BPE;
use tokenizers::Model;

/// Sorted code point ranges of one Unicode class.
struct CharClass(Vec<(char, char)>);

impl CharClass {
    fn parse(pattern: &str) -> CharClass {
        let hir = regex_syntax::Parser::new()
            .parse(pattern)
            .expect("a valid class pattern");
        match hir.kind() {
            HirKind::Class(Class::Unicode(c)) => {
                CharClass(c.ranges().iter().map(|r| (r.start(), r.end())).collect())
            }
            _ => unreachable!("`{pattern}` is a Unicode class"),
        }
    }

    fn contains(&self, c: char) -> bool {
        self.0
            .binary_search_by(|&(lo, hi)| {
                if hi < c {
                    std::cmp::Ordering::Less
                } else if lo > c {
                    std::cmp::Ordering::Greater
                } else {
                    std::cmp::Ordering::Equal
                }
            })
            .is_ok()
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Letter,
    Number,
    Space,
    Other,
}

struct Classes {
    letter: CharClass,
    number: CharClass,
    space: CharClass,
}

fn classes() -> &'static Classes {
    static CLASSES: OnceLock<Classes> = OnceLock::new();
    CLASSES.get_or_init(|| Classes {
        letter: CharClass::parse(r"\p{L}"),
        number: CharClass::parse(r"\p{N}"),
        space: CharClass::parse(r"\s"),
    })
}

fn kind(c: char) -> Kind {
    if c.is_ascii() {
        return match c {
            'a'..='z' | 'A'..='Z' => Kind::Letter,
            '0'..='9' => Kind::Number,
            ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r' => Kind::Space,
            _ => Kind::Other,
        };
    }
    let k = classes();
    if k.letter.contains(c) {
        Kind::Letter
    } else if k.number.contains(c) {
        Kind::Number
    } else if k.space.contains(c) {
        Kind::Space
    } else {
        Kind::Other
    }
}

/// The pieces GPT-2's pattern cuts `text` into, in order (leftmost-first alternation).
pub fn pieces(text: &str) -> Vec<&str> {
    let chars: Vec<(usize, char, Kind)> =
        text.char_indices().map(|(i, c)| (i, c, kind(c))).collect();
    let end_of = |j: usize| chars.get(j).map_or(text.len(), |c| c.0);
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let (start, c, k) = chars[i];
        // 's 't 're 've 'm 'll 'd
        if c == '\'' {
            let next = |n: usize| chars.get(i + n).map(|x| x.1);
            let len = match (next(1), next(2)) {
                (Some('s' | 't' | 'm' | 'd'), _) => 2,
                (Some('r'), Some('e')) | (Some('v'), Some('e')) | (Some('l'), Some('l')) => 3,
                _ => 0,
            };
            if len > 0 {
                out.push(&text[start..end_of(i + len)]);
                i += len;
                continue;
            }
        }
        // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`
        let (body, first) = if c == ' ' {
            match chars.get(i + 1) {
                Some(&(_, _, nk)) if nk != Kind::Space => (nk, i + 1),
                _ => (Kind::Space, i),
            }
        } else {
            (k, i)
        };
        if body != Kind::Space {
            let mut j = first;
            while j < chars.len() && chars[j].2 == body {
                j += 1;
            }
            out.push(&text[start..end_of(j)]);
            i = j;
            continue;
        }
        // `\s+(?!\S)`, else `\s+`
        let mut j = i;
        while j < chars.len() && chars[j].2 == Kind::Space {
            j += 1;
        }
        let stop = if j < chars.len() && j - i > 1 {
            j - 1
        } else {
            j
        };
        out.push(&text[start..end_of(stop)]);
        i = stop;
    }
    out
}

/// GPT-2's `bytes_to_unicode`: the printable character standing for each byte.
fn byte_chars() -> &'static [char; 256] {
    static TABLE: OnceLock<[char; 256]> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table = ['\0'; 256];
        let mut extra = 0u32;
        for b in 0..256u32 {
            let printable =
                (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
            table[b as usize] = if printable {
                char::from_u32(b).expect("a Latin-1 code point")
            } else {
                extra += 1;
                char::from_u32(255 + extra).expect("a code point below 512")
            };
        }
        table
    })
}

/// Pieces whose ids a worker thread keeps before it starts over (bounds its memory).
const CACHE_LIMIT: usize = 1 << 20;

thread_local! {
    static CACHE: RefCell<HashMap<String, Vec<u32>>> = RefCell::new(HashMap::new());
}

/// Appends the ids of `text` (no added token in it) under `bpe` to `out`.
pub fn encode_into(bpe: &BPE, text: &str, out: &mut Vec<u32>) -> Result<()> {
    let table = byte_chars();
    CACHE.with(|cache| {
        let mut cache = cache.borrow_mut();
        let mut mapped = String::new();
        for piece in pieces(text) {
            if let Some(ids) = cache.get(piece) {
                out.extend_from_slice(ids);
                continue;
            }
            mapped.clear();
            mapped.extend(piece.bytes().map(|b| table[b as usize]));
            let ids: Vec<u32> = bpe
                .tokenize(&mapped)
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .into_iter()
                .map(|t| t.id)
                .collect();
            out.extend_from_slice(&ids);
            if cache.len() >= CACHE_LIMIT {
                cache.clear();
            }
            cache.insert(piece.to_string(), ids);
        }
        Ok(())
    })
}
