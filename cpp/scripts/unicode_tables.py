"""Print the C++ code point range tables of cpp/src/tokenizer.cpp, probed from Hugging Face tokenizers.

The pre-tokenizer regexes (Oniguruma inside tokenizers) decide what a letter, a number or a mark is by their own
Unicode data, which is neither Python's unicodedata nor the C++ standard library's. So each class is found by
asking tokenizers itself: a Split pre-tokenizer that isolates the class runs over every code point (surrogates
aside), each one between two separators outside the class, and a code point that comes back as a piece of its own
is in the class.

    python cpp/scripts/unicode_tables.py            # every table
    python cpp/scripts/unicode_tables.py kMarkRanges

Tables: kLetterRanges (\\p{L}), kNumberRanges (\\p{N}), kMarkRanges (\\p{M}), kUpperRanges (\\p{Lu} and \\p{Lt}: the
letters of Tekken's first class that its second lacks), kLowerRanges (\\p{Ll}: the reverse).
"""
from __future__ import annotations

import sys


def members(cls: str, sep: str) -> set[int]:
    """Code points the regex class `cls` matches (sep: a character outside it)."""
    from tokenizers import Regex, pre_tokenizers

    split = pre_tokenizers.Split(Regex(cls), behavior="isolated", invert=False)
    cps = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    out: set[int] = set()
    step = 20000
    for k in range(0, len(cps), step):
        chunk = cps[k:k + step]
        for _, (a, b) in split.pre_tokenize_str(sep.join(map(chr, chunk))):
            if b - a == 1 and a % 2 == 0:   # probed code points sit at even offsets
                out.add(chunk[a // 2])
    return out


def ranges(s: set[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for c in sorted(s):
        if out and out[-1][1] == c - 1:
            out[-1] = (out[-1][0], c)
        else:
            out.append((c, c))
    return out


def tables() -> dict[str, set[int]]:
    upper = members(r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", "0")   # Tekken's (and GPT-4o's) two letter classes
    lower = members(r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]", "0")
    return {"kLetterRanges": members(r"\p{L}", "0"), "kNumberRanges": members(r"\p{N}", "a"),
            "kMarkRanges": members(r"\p{M}", "0"), "kUpperRanges": upper - lower, "kLowerRanges": lower - upper}


def main(names: list[str]) -> None:
    for name, s in tables().items():
        if names and name not in names:
            continue
        cells = [f"{{0x{a:X}, 0x{b:X}}}," for a, b in ranges(s)]
        print(f"static const CpRange {name}[] = {{")
        line = "   "
        for cell in cells:
            if len(line) + 1 + len(cell) > 112:
                print(line)
                line = "   "
            line += " " + cell
        print(line)
        print("};")


if __name__ == "__main__":
    main(sys.argv[1:])
