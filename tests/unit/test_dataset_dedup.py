"""Exact and near-duplicate detection: small edits are caught, rows sharing a template are not."""

from __future__ import annotations

import random
import tracemalloc

from services.dataset.dedup import (
    MIN_TOKENS,
    ExactDuplicates,
    NearDuplicates,
    normalize_for_dedup,
)

VOCABULARY = (
    "the a of to and in is was for on that with as by at from it this be are have has had not "
    "but or an they we you he she which their there been more when will would can could about "
    "into than them some what time people year way day man thing woman life child world school "
    "state family student group country problem hand part place case week company system program "
    "question work government number night point home water room mother area money story fact "
    "month lot right study book eye job word business issue side kind head house service friend "
    "father power hour game line end member law car city community name president team minute "
    "idea kid body information back parent face others level office door health person art war "
    "history party result change morning reason research girl guy moment air teacher force "
    "education river garden winter bridge market engine signal forest island letter kitchen"
).split()


def paragraph(rng: random.Random, words: int = 40) -> str:
    sentences, left = [], words
    while left > 0:
        length = min(left, rng.randint(6, 14))
        sentence = " ".join(rng.choice(VOCABULARY) for _ in range(length))
        sentences.append(sentence[0].upper() + sentence[1:] + ".")
        left -= length
    return " ".join(sentences)


def replace_word(rng: random.Random, text: str) -> str:
    words = text.split(" ")
    at = rng.randrange(len(words))
    words[at] = "zebra" + words[at][-1] if words[at].endswith(".") else "zebra"
    return " ".join(words)


def typo(rng: random.Random, text: str) -> str:
    words = text.split(" ")
    at = max(range(len(words)), key=lambda i: len(words[i].strip(".")))  # a word of 3+ letters
    word = words[at]
    words[at] = word[0] + word[2] + word[1] + word[3:]  # swapped letters
    return " ".join(words)


def punctuation(rng: random.Random, text: str) -> str:
    return text.replace(". ", "; ", 1).replace(" ", ", ", 2).rstrip(".") + "!"


def casing_and_spacing(rng: random.Random, text: str) -> str:
    return "  " + text.upper().replace(" ", "\n", 3) + " "


EDITS = (replace_word, typo, punctuation, casing_and_spacing)


def near_duplicates(rows: list[str], threshold: float = 0.8) -> dict[int, tuple[int, float]]:
    finder = NearDuplicates(threshold)
    for row in rows:
        finder.add(row)
    return {row: (earlier, jaccard) for row, earlier, jaccard in finder.finish()}


def test_normalize_for_dedup():
    assert normalize_for_dedup("  Ｈｅｌｌｏ\u00a0WORLD\n\tagain ") == "hello world again"
    assert normalize_for_dedup("Straße ﬁne") == "strasse fine"  # casefold, NFKC ligature
    assert normalize_for_dedup("Done.") != normalize_for_dedup("Done?")  # punctuation kept


def test_exact_duplicates_map_each_repeat_to_its_first_occurrence():
    finder = ExactDuplicates()
    rows = ["alpha", "beta", "  ALPHA ", "gamma", "Beta", "alpha", "alpha!", "ｇａｍｍａ"]
    for row in rows:
        finder.add(row)
    assert finder.finish() == {2: 0, 4: 1, 5: 0, 7: 3}
    assert ExactDuplicates().finish() == {}


def test_exact_duplicates_across_storage_chunks():
    finder = ExactDuplicates()
    for i in range(200_000):  # > 3 chunks of 65,536 hashes
        finder.add(f"row {i % 150_000}")
    duplicates = finder.finish()
    assert duplicates == {i: i - 150_000 for i in range(150_000, 200_000)}


def test_exact_duplicates_of_a_million_rows_stay_under_30_mb():
    finder = ExactDuplicates()
    for i in range(1_000_000):
        finder.add(f"{i % 990_000}")
    assert finder.nbytes < 9 * 2**20  # 8 bytes per row + less than one chunk of slack
    tracemalloc.start()
    try:
        duplicates = finder.finish()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(duplicates) == 10_000 and duplicates[999_999] == 9_999
    assert finder.nbytes + peak < 30 * 2**20, peak


def test_small_edits_are_near_duplicates_of_the_original():
    rng = random.Random(7)
    originals = [paragraph(rng) for _ in range(120)]
    rows, expected = list(originals), {}
    for number, original in enumerate(originals):
        edit = EDITS[number % len(EDITS)]
        expected[len(rows)] = number
        rows.append(edit(rng, original))
    found = near_duplicates(rows)
    assert {row: earlier for row, (earlier, _) in found.items()} == expected
    assert min(jaccard for _, jaccard in found.values()) >= 0.8


def test_estimated_similarity_tracks_the_edit_size():
    rng = random.Random(11)
    original = paragraph(rng, 60)
    one_word = replace_word(rng, original)
    found = near_duplicates([original, original.lower(), one_word], threshold=0.5)
    assert found[1] == (0, 1.0)
    # one word of 60 changes 2 of 59 bigrams: true Jaccard 57/61 = 0.93
    assert abs(found[2][1] - 57 / 61) < 0.1


def test_rows_sharing_topic_or_template_words_are_not_merged():
    capitals = [f"The capital of {country} is {city}." for country, city in [
        ("France", "Paris"), ("Spain", "Madrid"), ("Italy", "Rome"), ("Japan", "Tokyo"),
        ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Norway", "Oslo"), ("Chile", "Santiago")]]
    rng = random.Random(3)
    templated = [
        f"Question: what is the boiling point of {substance} at sea level? Answer: the boiling "
        f"point of {substance} at sea level is {rng.randint(-200, 400)} degrees Celsius, "
        f"measured by {rng.choice(['Lee', 'Okafor', 'Berg', 'Silva'])} "
        f"in {rng.randint(1900, 2020)}."
        for substance in ["water", "ethanol", "mercury", "nitrogen", "acetone", "benzene",
                          "glycerol", "methanol", "helium", "toluene"]
    ]
    reviews = [
        f"I bought the {product} for my {who} and it {verdict}. Delivery took {days} days and "
        f"the box was {state}; I would {again} buy from this shop again."
        for product, who, verdict, days, state, again in [
            ("desk lamp", "office", "works great", 3, "intact", "definitely"),
            ("water filter", "kitchen", "broke after a week", 9, "crushed", "never"),
            ("bike helmet", "son", "fits perfectly", 2, "fine", "happily"),
            ("air purifier", "bedroom", "is far too loud", 6, "damp", "not"),
        ]
    ]
    assert near_duplicates(capitals + templated + reviews) == {}


def test_no_eligible_rows_means_no_near_duplicates():
    assert NearDuplicates().finish() == []
    assert near_duplicates(["too short", "too short"]) == {}


def test_very_short_rows_are_not_near_matched():
    rows = ["Yes.", "yes!", "Thank you so much", "thank you, so much!", "OK then"]
    assert all(len(normalize_for_dedup(r).split()) < MIN_TOKENS for r in rows)
    assert near_duplicates(rows) == {}


def test_a_cluster_maps_every_member_to_its_earliest_row():
    rng = random.Random(5)
    first = paragraph(rng, 40)
    second = replace_word(rng, first)
    third = replace_word(rng, second)
    rows = [paragraph(rng), first, paragraph(rng), second, third, paragraph(rng), first]
    found = near_duplicates(rows)
    assert {row: earlier for row, (earlier, _) in found.items()} == {3: 1, 4: 1, 6: 1}
    assert found[6][1] == 1.0


def test_long_rows_spanning_hash_batches_and_cjk_text():
    rng = random.Random(9)
    long_row = paragraph(rng, 20_000)  # more shingles than one hashing batch
    chinese = "今天天气很好我们一起去公园散步然后在湖边吃午饭"
    rows = [long_row, chinese, "昨天下雨了所以我们在家里看电影和读书直到晚上",
            replace_word(rng, long_row), chinese.replace("湖边", "河边")]
    assert {row: earlier for row, (earlier, _) in near_duplicates(rows).items()} == {3: 0, 4: 1}


def test_near_duplicates_memory_is_bounded_per_row():
    rng = random.Random(1)
    finder = NearDuplicates()
    rows = 70_000  # > one storage chunk
    for _ in range(rows):
        finder.add(" ".join(rng.choice(VOCABULARY) for _ in range(MIN_TOKENS)))
    # 64 bytes of signature + 8 of row number, allocated 65,536 rows at a time
    assert finder.nbytes == 2 * 65_536 * 72
    assert len(finder.finish()) < rows // 100  # random 5-word rows rarely collide
