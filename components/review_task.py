"""The offline embedded task: generated product reviews, a known gold reward and a noisy simulated annotator.

Real RLHF can only be judged by people. Here a GOLD reward stands for human judgement, so every claim is
checkable: a reward model's accuracy against the annotator's Bayes ceiling, a policy's gold win rate over SFT,
an AI judge's agreement with gold, and reward hacking (proxy reward rising while gold falls).

Prompts read "Review of the <topic>:"; completions are short lower-case reviews from a small template
grammar over a sentiment lexicon, so a ~1 M-parameter model with a ~500-token BPE vocabulary learns the task
in about a minute of CPU. The gold reward is lexicon sentiment minus penalties for degenerate text (wrong
length, repetition, keyword stuffing), squashed into (-2, 2). Demonstrations mix qualities (positive, mixed,
negative, degenerate) so SFT alone sits near gold 0; preference pairs include short and repetitive texts so
that a reward model learns they are bad.

Everything is deterministic from a seed: each split draws from its own `random.Random` stream, never global
state. The constants below (lexicon, topics, templates, quality mixtures, gold weights) define the task.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

# ---------------------------------------------------------------------------------------- the task's words
# Multi-line strings of words, split on whitespace.
_STRONG_POSITIVE = """excellent great superb fantastic wonderful brilliant perfect outstanding amazing lovely
impressive flawless"""
_MILD_POSITIVE = """good nice solid decent pleasant sturdy reliable handy comfortable smooth sleek elegant
durable quiet"""
_STRONG_NEGATIVE = """terrible awful horrible useless dreadful broken pathetic faulty disappointing shoddy
worthless bad"""
_MILD_NEGATIVE = """poor flimsy slow noisy weak dull clunky awkward fragile annoying uncomfortable mediocre
loose sticky"""
_NEUTRAL = "ordinary average standard typical plain normal simple basic usual regular modest okay"

#: Word polarity of the sentiment lexicon: strong words ±1, mild words ±0.5, neutral words 0.
POLARITY: dict[str, float] = {
    **{w: 1.0 for w in _STRONG_POSITIVE.split()},
    **{w: 0.5 for w in _MILD_POSITIVE.split()},
    **{w: -1.0 for w in _STRONG_NEGATIVE.split()},
    **{w: -0.5 for w in _MILD_NEGATIVE.split()},
    **{w: 0.0 for w in _NEUTRAL.split()},
}
POSITIVE_WORDS = tuple(w for w, p in POLARITY.items() if p > 0)
NEGATIVE_WORDS = tuple(w for w, p in POLARITY.items() if p < 0)
NEUTRAL_WORDS = tuple(w for w, p in POLARITY.items() if p == 0)

#: Product topics with two topic-specific aspects each; the last six are held out of all training splits.
TOPIC_ASPECTS: dict[str, tuple[str, str]] = {
    "phone": ("screen", "battery"), "laptop": ("keys", "battery"), "tablet": ("screen", "case"),
    "headphones": ("sound", "cushion"), "camera": ("lens", "battery"), "watch": ("strap", "display"),
    "speaker": ("sound", "buttons"), "keyboard": ("keys", "cable"), "mouse": ("buttons", "grip"),
    "monitor": ("display", "stand"), "printer": ("tray", "cable"), "router": ("signal", "antenna"),
    "kettle": ("lid", "handle"), "toaster": ("dial", "tray"), "blender": ("blade", "motor"),
    "vacuum": ("motor", "hose"), "lamp": ("light", "base"), "fan": ("motor", "blade"),
    "heater": ("dial", "cord"), "backpack": ("strap", "zipper"), "jacket": ("fabric", "zipper"),
    "boots": ("sole", "laces"), "umbrella": ("handle", "frame"), "tent": ("fabric", "pole"),
    "bicycle": ("seat", "frame"), "helmet": ("strap", "padding"), "drill": ("motor", "grip"),
    "chair": ("seat", "cushion"), "desk": ("surface", "frame"), "mattress": ("foam", "cover"),
    "pillow": ("foam", "cover"), "blanket": ("fabric", "stitching"), "mug": ("handle", "glaze"),
    "pan": ("coating", "handle"), "knife": ("blade", "handle"),
    "scooter": ("wheels", "battery"), "projector": ("lens", "light"), "microwave": ("door", "buttons"),
    "suitcase": ("wheels", "zipper"), "sofa": ("cushion", "fabric"), "guitar": ("strings", "neck"),
}  # fmt: skip
TOPICS = tuple(TOPIC_ASPECTS)
HELD_OUT_TOPICS = TOPICS[-6:]
TRAIN_TOPICS = TOPICS[:-6]
GENERIC_ASPECTS = ("price", "design", "size", "weight", "finish")
PROMPT_MODIFIERS = ("", "new ", "black ", "white ", "small ", "large ", "blue ", "red ")
ADVERBS = ("very", "really", "quite", "rather", "pretty", "fairly", "truly")
OPENERS = ("i bought this {t} last month.", "this {t} arrived on time.", "i use it every day.",
           "we have had it for a few weeks.", "i got this {t} as a gift.")  # fmt: skip
SENTENCES = ("the {a} is {j}.", "the {a} is {v} {j}.", "the {a} feels {j}.", "the {a} looks {j}.",
             "i found the {a} {j}.")  # fmt: skip
NEUTRAL_CLOSERS = ("it does the job.", "it is what it is.")
PLURALS = frozenset({"keys", "buttons", "laces", "wheels", "strings", "headphones", "boots"})
#: Words that carry no content; repetition of these is normal and not penalised.
FUNCTION_WORDS = frozenset("the is a it i this and but of on for as we have had got use every".split())

# ------------------------------------------------------------------------------------- the task's mixtures
QUALITIES = ("positive", "mixed", "negative", "degenerate")
#: Demonstrations: mediocre on average (mean gold near 0) so RL/DPO have room to improve.
SFT_QUALITY_WEIGHTS = {"positive": 0.38, "mixed": 0.3, "negative": 0.2, "degenerate": 0.12}
#: Preference candidates: more degenerate text, so a reward model learns that short/repeated text is bad.
PREFERENCE_QUALITY_WEIGHTS = {"positive": 0.3, "mixed": 0.2, "negative": 0.2, "degenerate": 0.3}
#: Per-sentence polarity mix within each non-degenerate quality class: (positive, neutral, negative).
SENTENCE_POLARITY = {"positive": (0.85, 0.15, 0.0), "mixed": (0.4, 0.2, 0.4), "negative": (0.0, 0.15, 0.85)}
DEGENERATE_KINDS = ("repeat_word", "repeat_sentence", "one_word", "short", "ramble", "stuffing")
DEGENERATE_WEIGHTS = (0.25, 0.2, 0.15, 0.15, 0.15, 0.1)

# ------------------------------------------------------------------------------------ the gold's constants
TARGET_WORDS = (8, 25)  # a well-formed review has this many words (inclusive)
SENTIMENT_SCALE = 1.5  # sentiment = SENTIMENT_SCALE * tanh(net polarity of distinct words / 2)
SHORT_PENALTY = 2.0  # times the missing fraction of TARGET_WORDS[0]; an empty text loses all of it
LONG_PENALTY_PER_WORD, LONG_PENALTY_MAX = 0.15, 2.0
REPEATED_WORD_PENALTY = 2.0  # times the fraction of repeated content words
REPEATED_BIGRAM_PENALTY = 1.0  # times the fraction of repeated bigrams
STUFFING_THRESHOLD, STUFFING_PENALTY = 0.5, 4.0  # polar-word density above the threshold, times the penalty
GOLD_BOUND = 2.0  # gold = GOLD_BOUND * tanh(raw / GOLD_BOUND): monotone, within (-2, 2)

_WORD_RE = re.compile(r"[a-z]+")


class RandomSource(Protocol):
    """Anything with `random() -> float` in [0, 1): `random.Random` or a numpy `Generator`."""

    def random(self) -> float: ...


# ------------------------------------------------------------------------------------------------ gold reward
def words_of(text: str) -> list[str]:
    """Lower-case words of `text` (letters only), the unit every gold term counts in."""
    return _WORD_RE.findall(text.lower())


def _repetition(words: Sequence[str]) -> float:
    content = [w for w in words if w not in FUNCTION_WORDS]
    word_rep = 1.0 - len(set(content)) / len(content) if content else 0.0
    bigrams = list(zip(words, words[1:], strict=False))
    bigram_rep = 1.0 - len(set(bigrams)) / len(bigrams) if bigrams else 0.0
    return REPEATED_WORD_PENALTY * word_rep + REPEATED_BIGRAM_PENALTY * bigram_rep


def _length_penalty(n_words: int) -> float:
    low, high = TARGET_WORDS
    if n_words < low:
        return SHORT_PENALTY * (low - n_words) / low
    return min(LONG_PENALTY_MAX, LONG_PENALTY_PER_WORD * max(0, n_words - high))


def gold_terms(text: str) -> dict[str, float]:
    """The gold reward's parts for one completion: sentiment, each penalty, and the squashed total `gold`.

    Sentiment counts each polar word once (repeating "great" earns nothing). Penalties: words outside
    TARGET_WORDS, repeated content words and bigrams, and a polar-word density above STUFFING_THRESHOLD.
    """
    words = words_of(text)
    polar = [w for w in words if POLARITY.get(w, 0.0) != 0.0]
    net = sum(POLARITY[w] for w in set(polar))
    terms = {
        "sentiment": SENTIMENT_SCALE * math.tanh(net / 2.0),
        "length_penalty": _length_penalty(len(words)),
        "repetition_penalty": _repetition(words),
        "stuffing_penalty": STUFFING_PENALTY * max(0.0, len(polar) / max(1, len(words)) - STUFFING_THRESHOLD),
    }
    raw = terms["sentiment"] - sum(v for k, v in terms.items() if k.endswith("_penalty"))
    terms["gold"] = GOLD_BOUND * math.tanh(raw / GOLD_BOUND)
    return terms


def gold_reward(text: str) -> float:
    """Gold reward of a completion (score the completion only, not the prompt): stands for human judgement."""
    return gold_terms(text)["gold"]


def gold_rewards(texts: Iterable[str]) -> list[float]:
    """Gold rewards of many completions (for evaluation loops over generated batches)."""
    return [gold_reward(t) for t in texts]


# ------------------------------------------------------------------------------------------------- annotator
def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def preference_probability(gold_a: float, gold_b: float, temperature: float) -> float:
    """Bradley-Terry probability that the simulated annotator prefers a over b: sigmoid((g_a - g_b) / T)."""
    if temperature <= 0:
        return 1.0 if gold_a > gold_b else 0.0 if gold_a < gold_b else 0.5
    return _sigmoid((gold_a - gold_b) / temperature)


def annotate_pair(gold_a: float, gold_b: float, temperature: float, rng: RandomSource) -> bool:
    """Simulated annotator: True when it prefers a, sampled by Bradley-Terry (T = 0 is a noiseless judge)."""
    return rng.random() < preference_probability(gold_a, gold_b, temperature)


def bayes_ceiling(gold_chosen: Sequence[float], gold_rejected: Sequence[float], temperature: float) -> float:
    """Expected accuracy of the gold reward itself on the annotator's noisy labels, E[max(p, 1 - p)].

    No reward model can beat it in expectation, so a reward model's held-out accuracy is read against it.
    """
    if not gold_chosen:
        raise ValueError("bayes_ceiling needs at least one pair")
    pairs = zip(gold_chosen, gold_rejected, strict=True)
    return sum(max(p, 1.0 - p) for p in (preference_probability(c, r, temperature) for c, r in pairs)) / len(
        gold_chosen
    )


def label_accuracy(gold_chosen: Sequence[float], gold_rejected: Sequence[float]) -> float:
    """Fraction of labelled pairs whose chosen side has the higher gold (ties count half)."""
    if not gold_chosen:
        raise ValueError("label_accuracy needs at least one pair")
    pairs = zip(gold_chosen, gold_rejected, strict=True)
    hits = sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in pairs)
    return hits / len(gold_chosen)


# ----------------------------------------------------------------------------------------------- generator
def make_prompt(topic: str, rng: random.Random) -> str:
    """A prompt for `topic`, with a neutral modifier ("Review of the black phone:") for prompt variety."""
    return f"Review of the {rng.choice(PROMPT_MODIFIERS)}{topic}:"


def topic_of(prompt: str) -> str:
    """The topic a prompt asks about (its last word before the colon)."""
    return prompt.rstrip(":").split()[-1]


def _adjectives(polarity: str, rng: random.Random) -> list[str]:
    pool = {"positive": POSITIVE_WORDS, "negative": NEGATIVE_WORDS, "neutral": NEUTRAL_WORDS}[polarity]
    return rng.sample(pool, len(pool))


def _sentence(aspect: str, adjective: str, adverbs: list[str], rng: random.Random) -> str:
    template = rng.choice(SENTENCES)
    if "{v}" in template and not adverbs:
        template = SENTENCES[0]
    adverb = adverbs.pop() if "{v}" in template else ""
    sentence = template.format(a=aspect, j=adjective, v=adverb)
    if aspect in PLURALS:  # "the keys are", "the wheels feel"
        sentence = sentence.replace(" is ", " are ").replace(" feels ", " feel ").replace(" looks ", " look ")
    return sentence


def _review(topic: str, quality: str, rng: random.Random) -> str:
    """A well-formed review of one quality class: optional opener, 2-3 aspect sentences, optional closer."""
    aspects = rng.sample(TOPIC_ASPECTS[topic] + GENERIC_ASPECTS, 3)[: rng.choice((2, 3, 3))]
    pools = {p: _adjectives(p, rng) for p in ("positive", "neutral", "negative")}
    adverbs = rng.sample(ADVERBS, len(ADVERBS))
    weights = SENTENCE_POLARITY[quality]
    opener = rng.choice(OPENERS).format(t=topic)
    opener = opener.replace("this", "these") if topic in PLURALS else opener  # "these boots"
    sentences = [opener] if rng.random() < 0.3 else []
    for aspect in aspects:
        polarity = rng.choices(("positive", "neutral", "negative"), weights=weights)[0]
        sentences.append(_sentence(aspect, pools[polarity].pop(), adverbs, rng))
    if rng.random() < 0.5:
        closer_polarity = {"positive": "positive", "negative": "negative", "mixed": "neutral"}[quality]
        closer = f"overall it is {pools[closer_polarity].pop()}."
        sentences.append(rng.choice(NEUTRAL_CLOSERS) if quality == "mixed" and rng.random() < 0.5 else closer)
    return " " + " ".join(sentences)


def _degenerate(topic: str, rng: random.Random) -> str:
    """A degenerate text, mostly positive-worded (the direction a policy hacks a naive reward model in)."""
    kind = rng.choices(DEGENERATE_KINDS, weights=DEGENERATE_WEIGHTS)[0]
    polarity = rng.choices(("positive", "neutral", "negative"), weights=(0.7, 0.1, 0.2))[0]
    adjectives = _adjectives(polarity, rng)
    aspect = rng.choice(TOPIC_ASPECTS[topic] + GENERIC_ASPECTS)
    if kind == "repeat_word":
        return " " + " ".join([adjectives[0]] * rng.randint(3, 12))
    if kind == "repeat_sentence":
        return " " + " ".join([f"the {aspect} is {adjectives[0]}."] * rng.randint(3, 5))
    if kind == "one_word":
        return " " + rng.choice((adjectives[0], f"{adjectives[0]}.", aspect))
    if kind == "short":
        return " " + rng.choice((f"{adjectives[0]} {aspect}.", f"the {topic} is {adjectives[0]}."))
    if kind == "stuffing":
        return " " + " ".join(_adjectives("positive", rng)[: rng.randint(5, 9)])
    return _ramble(topic, rng)


def _ramble(topic: str, rng: random.Random) -> str:
    """Reviews run together until the text is clearly too long (and, over few aspects, repetitive)."""
    text = ""
    while len(words_of(text)) <= TARGET_WORDS[1] + 5:
        text += _review(topic, rng.choice(QUALITIES[:2]), rng)
    return text


def generate_completion(topic: str, quality: str, rng: random.Random) -> str:
    """One completion (leading space, so prompt + completion reads naturally) of a quality class for `topic`.

    Well-formed classes are redrawn until their word count lies in TARGET_WORDS.
    """
    if quality == "degenerate":
        return _degenerate(topic, rng)
    if quality not in SENTENCE_POLARITY:
        raise ValueError(f"unknown quality {quality!r}; expected one of {QUALITIES}")
    while True:
        text = _review(topic, quality, rng)
        if TARGET_WORDS[0] <= len(words_of(text)) <= TARGET_WORDS[1]:
            return text


def _draw(topics: Sequence[str], weights: dict[str, float], rng: random.Random) -> tuple[str, str]:
    """Draw (prompt, completion) with a quality class from `weights`."""
    topic = rng.choice(topics)
    quality = rng.choices(list(weights), weights=list(weights.values()))[0]
    return make_prompt(topic, rng), generate_completion(topic, quality, rng)


def _eval_topics(rng: random.Random) -> tuple[str, ...]:
    """Half the evaluation draws come from held-out topics, half from training topics."""
    return HELD_OUT_TOPICS if rng.random() < 0.5 else TRAIN_TOPICS


class Labeller(Protocol):
    """One annotator profile (components/annotators.py `AnnotatorProfile`): its name, what it values (`utility`,
    its gold) and the Bradley–Terry noise of its choices."""

    name: str
    temperature: float

    def utility(self, text: str) -> float: ...


def _label(a: str, b: str, golds: tuple[float, float], temperature: float, labeller: Labeller | None,
           rng: random.Random) -> tuple[bool, dict[str, Any]]:
    """Whether a is preferred, and the columns saying by whom: the gold annotator (no extra columns), or a
    profile choosing by its own utility (`annotator`, `utility_a`, `utility_b`; one draw from `rng` either way)."""
    if labeller is None:
        return annotate_pair(*golds, temperature, rng), {}
    u_a, u_b = labeller.utility(a), labeller.utility(b)
    return annotate_pair(u_a, u_b, labeller.temperature, rng), {"annotator": labeller.name, "utility_a": u_a,
                                                                  "utility_b": u_b}


def _pair(topics: Sequence[str], temperature: float, rng: random.Random,
          labeller: Labeller | None = None) -> dict[str, Any]:
    """Two completions of independently drawn quality for one prompt, labelled by the simulated annotator (or by
    `labeller`, whose name and utilities the row keeps)."""
    topic = rng.choice(topics)
    prompt = make_prompt(topic, rng)
    weights = PREFERENCE_QUALITY_WEIGHTS
    qualities = rng.choices(list(weights), weights=list(weights.values()), k=2)
    a = generate_completion(topic, qualities[0], rng)
    b = generate_completion(topic, qualities[1], rng)
    while b == a:  # identical texts carry no preference
        b = generate_completion(topic, qualities[1], rng)
    gold_a, gold_b = gold_reward(a), gold_reward(b)
    keep, extra = _label(a, b, (gold_a, gold_b), temperature, labeller, rng)
    if not keep:
        a, b, gold_a, gold_b = b, a, gold_b, gold_a
    row = {"prompt": prompt, "chosen": a, "rejected": b, "gold_chosen": gold_a, "gold_rejected": gold_b}
    if extra:  # the utilities follow the sides: chosen is a when kept
        order = ("utility_a", "utility_b") if keep else ("utility_b", "utility_a")
        row |= {"annotator": extra["annotator"], "utility_chosen": extra[order[0]],
                "utility_rejected": extra[order[1]]}
    return row


def _profiles(annotators: Sequence[Mapping[str, Any]]) -> list[tuple[Labeller, float]]:
    """(profile, share) for each `data.embedded.annotators` node; `share` (default 1) is its relative share of
    the pairs to label."""
    from components.annotators import profiles_from_config  # annotators builds on this module's gold terms

    shares = [float(node.get("share", 1.0)) for node in annotators]
    return list(zip(profiles_from_config(annotators), shares, strict=True))


def assign_labellers(profiles: Sequence[tuple[Labeller, float]], n: int, rng: random.Random) -> list[Labeller | None]:
    """Who labels each of `n` pairs: every profile its share (largest remainder, so counts are exact), in an
    order shuffled by `rng`; with no profiles, the gold annotator (None) labels them all."""
    if not profiles:
        return [None] * n
    total = sum(share for _, share in profiles)
    exact = [n * share / total for _, share in profiles]
    counts = [math.floor(x) for x in exact]
    for k in sorted(range(len(exact)), key=lambda k: counts[k] - exact[k])[: n - sum(counts)]:
        counts[k] += 1
    who = [profile for (profile, _), count in zip(profiles, counts, strict=True) for _ in range(count)]
    rng.shuffle(who)
    return who


def _stream(seed: int, split: str) -> random.Random:
    """An independent random stream per split, so one split's size never changes another's content."""
    return random.Random(f"alignflow-embedded:{seed}:{split}")


def build_embedded_splits(
    n_sft: int,
    n_preference: int,
    n_eval_preference: int,
    n_prompts: int,
    n_eval_prompts: int,
    annotator_temperature: float,
    seed: int,
    annotators: Sequence[Mapping[str, Any]] = (),
) -> dict[str, list[dict]]:
    """Generate every split of the embedded task, deterministically from `seed`.

    "sft" (prompt, completion) and "preference"/"prompts" use training topics only; "preference_eval" and
    "eval_prompts" draw half their prompts from held-out topics. Preference rows keep the gold of both sides.
    With `annotators` (profile nodes, components/annotators.py), each profile labels its share of the training and
    held-out pairs by its own utility, and the rows keep who labelled them (`annotator`) and both utilities.
    """
    rngs = {name: _stream(seed, name) for name in ("sft", "preference", "preference_eval", "prompts", "eval")}
    sft = [_draw(TRAIN_TOPICS, SFT_QUALITY_WEIGHTS, rngs["sft"]) for _ in range(n_sft)]
    eval_rng = rngs["eval"]
    profiles = _profiles(annotators)
    who = {name: assign_labellers(profiles, n, _stream(seed, f"{name}:annotators"))
           for name, n in (("preference", n_preference), ("preference_eval", n_eval_preference))}
    return {
        "sft": [{"prompt": p, "completion": c} for p, c in sft],
        "preference": [
            _pair(TRAIN_TOPICS, annotator_temperature, rngs["preference"], w) for w in who["preference"]
        ],
        "preference_eval": [
            _pair(_eval_topics(rngs["preference_eval"]), annotator_temperature, rngs["preference_eval"], w)
            for w in who["preference_eval"]
        ],
        "prompts": [{"prompt": make_prompt(rngs["prompts"].choice(TRAIN_TOPICS), rngs["prompts"])}
                    for _ in range(n_prompts)],
        "eval_prompts": [{"prompt": make_prompt(eval_rng.choice(_eval_topics(eval_rng)), eval_rng)}
                         for _ in range(n_eval_prompts)],
    }  # fmt: skip


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _pair_stats(rows: Sequence[dict], temperature: float, prefix: str) -> dict[str, float]:
    chosen = [r["gold_chosen"] for r in rows]
    rejected = [r["gold_rejected"] for r in rows]
    if not rows:
        return {}
    return {
        f"{prefix}_bayes_ceiling": bayes_ceiling(chosen, rejected, temperature),
        f"{prefix}_label_accuracy": label_accuracy(chosen, rejected),
        f"{prefix}_mean_gold_chosen": _mean(chosen),
        f"{prefix}_mean_gold_rejected": _mean(rejected),
    }


def embedded_stats(splits: dict[str, list[dict]], annotator_temperature: float,
                   annotators: Sequence[Mapping[str, Any]] = ()) -> dict[str, float]:
    """Summary numbers of a built task, to log with the data: sizes, SFT mean gold, annotator noise, ceilings.

    `preference_eval_bayes_ceiling` bounds any reward model's held-out accuracy; `*_label_accuracy` is how
    often the annotator's label agrees with gold. With `annotators` (the profiles that labelled the pairs), the
    ceilings come from each profile's own utility and noise, per profile too, with the profiles' disagreement.
    """
    stats: dict[str, float] = {f"n_{name}": float(len(rows)) for name, rows in splits.items()}
    sft_gold = gold_rewards(r["completion"] for r in splits.get("sft", []))
    stats["sft_mean_gold"] = _mean(sft_gold)
    stats["sft_mean_words"] = _mean([len(words_of(r["completion"])) for r in splits.get("sft", [])])
    for name in ("preference", "preference_eval"):
        stats.update(_pair_stats(splits.get(name, []), annotator_temperature, name))
    if annotators:
        from components.annotators import profile_pair_stats

        profiles = [profile for profile, _ in _profiles(annotators)]
        for name in ("preference", "preference_eval"):
            stats.update(profile_pair_stats(splits.get(name, []), profiles, name))
    eval_prompts = splits.get("eval_prompts", [])
    held_out = [topic_of(r["prompt"]) in HELD_OUT_TOPICS for r in eval_prompts]
    stats["eval_prompts_held_out_fraction"] = _mean([float(h) for h in held_out])
    return stats


def _strings(value: Any) -> list[str]:
    """The text in a field: a string, or the contents of a list of {role, content} messages."""
    if isinstance(value, str):
        return [value]
    return [m["content"] for m in value or [] if isinstance(m, dict) and isinstance(m.get("content"), str)]


HELD_OUT_SPLITS = ("preference_eval", "eval_prompts")  # measure the models: no model may learn from them


def corpus(splits: dict[str, list[dict]]) -> list[str]:
    """The training texts of the task (prompt + completion, prompts, and lines of task words), for tokenizer training.

    The held-out splits (HELD_OUT_SPLITS) are left out, so the tokenizer, and every model built on it, is the same
    whatever they hold. The word lines make sure every topic, aspect and lexicon word is in the corpus, whatever
    the sample sizes. Rows in other standard formats (`text`, message lists) contribute their text too.
    """
    texts = [" ".join(POLARITY), " ".join(TOPICS + GENERIC_ASPECTS + ADVERBS)]
    texts += [" ".join(aspects) for aspects in TOPIC_ASPECTS.values()]
    texts += [f"Review of the {m}{t}:" for t in TOPICS for m in PROMPT_MODIFIERS]
    for split, rows in splits.items():
        if split in HELD_OUT_SPLITS:
            continue
        for row in rows:
            prompt = row.get("prompt", "")
            answers = [row[k] for k in ("completion", "chosen", "rejected", "text", "messages") if k in row]
            for answer in answers or [""]:
                if isinstance(prompt, str) and isinstance(answer, str):
                    texts.append(prompt + answer)
                else:
                    texts += _strings(prompt) + _strings(answer)
    return [t for t in texts if t]
