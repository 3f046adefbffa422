"""Topic classification data from Debian's ``fortunes`` package (``apt-get install fortunes``).

Each fortune file is a topic; a fortune is the text between ``%`` lines.  The
dataset is built the same way on every machine:

1. read the :data:`TOPICS` files, join each fortune's lines with single spaces;
2. drop fortunes shorter than :data:`MIN_CHARS` characters;
3. de-duplicate on a normalised key (lower case, letters and digits only):
   repeats inside a topic keep the first copy, and a text found under two
   topics is dropped from both (its label would be ambiguous);
4. keep at most :data:`PER_TOPIC` per topic (a shuffle with seed 0 picks them),
   so no topic dominates;
5. split stratified by topic 60 / 20 / 20 into train / validation / test with
   ``random_state=0``: the split does not depend on the experiment's seed.

``Fortunes.fingerprint`` (sha256 over every split's texts and labels) is
recorded with the results, so two runs can show they used the same data.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

FORTUNES_DIR = Path("/usr/share/games/fortunes")
#: Eight topics with distinct vocabularies and at least 200 fortunes each.
TOPICS = ("computers", "politics", "science", "songs-poems", "men-women", "work", "startrek", "law")
PER_TOPIC = 300
MIN_CHARS = 20
SPLIT = (0.6, 0.2, 0.2)


@dataclass
class Split:
    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class Fortunes:
    topics: tuple[str, ...]
    train: Split
    val: Split
    test: Split
    stats: dict[str, object] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for split in (self.train, self.val, self.test):
            for text, label in zip(split.texts, split.labels):
                digest.update(f"{label}\t{text}\n".encode())
        return digest.hexdigest()[:16]


def read_topic(path: Path) -> list[str]:
    """The fortunes of one file, each on one line."""
    text = path.read_text(encoding="utf-8", errors="replace")
    entries = re.split(r"^%\s*$", text, flags=re.MULTILINE)
    return [" ".join(e.split()) for e in entries if e.strip()]


def _key(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "", text.lower())


def load_fortunes(
    directory: Path = FORTUNES_DIR,
    topics: tuple[str, ...] = TOPICS,
    per_topic: int = PER_TOPIC,
) -> Fortunes:
    """The de-duplicated, balanced, split dataset (see the module docstring)."""
    from sklearn.model_selection import train_test_split

    if len(topics) < 2:
        raise ValueError(f"fortunes: need at least 2 topics, got {topics!r}")
    missing = [t for t in topics if not (Path(directory) / t).is_file()]
    if missing:
        raise FileNotFoundError(
            f"fortunes: no topic file(s) {missing} in {directory}; install Debian's package: apt-get install fortunes"
        )
    raw = {t: [s for s in read_topic(Path(directory) / t) if len(s) >= MIN_CHARS] for t in topics}
    owners: dict[str, set[str]] = {}
    for topic, texts in raw.items():
        for text in texts:
            owners.setdefault(_key(text), set()).add(topic)
    texts, labels, dropped_shared, dropped_repeats = [], [], 0, 0
    counts = {}
    for label, topic in enumerate(topics):
        seen: set[str] = set()
        kept = []
        for text in raw[topic]:
            key = _key(text)
            if len(owners[key]) > 1:
                dropped_shared += 1
            elif key in seen:
                dropped_repeats += 1
            else:
                seen.add(key)
                kept.append(text)
        random.Random(0).shuffle(kept)
        kept = kept[:per_topic]
        counts[topic] = len(kept)
        texts += kept
        labels += [label] * len(kept)
    rest_fraction = SPLIT[1] + SPLIT[2]
    train_i, rest_i = train_test_split(range(len(texts)), test_size=rest_fraction, stratify=labels, random_state=0)
    rest_labels = [labels[i] for i in rest_i]
    val_i, test_i = train_test_split(rest_i, test_size=SPLIT[2] / rest_fraction, stratify=rest_labels, random_state=0)

    def take(index) -> Split:
        return Split([texts[i] for i in index], [labels[i] for i in index])

    stats = {
        "per_topic": counts,
        "dropped_shared_between_topics": dropped_shared,
        "dropped_repeats": dropped_repeats,
        "sizes": {"train": len(train_i), "val": len(val_i), "test": len(test_i)},
    }
    return Fortunes(tuple(topics), take(train_i), take(val_i), take(test_i), stats)
