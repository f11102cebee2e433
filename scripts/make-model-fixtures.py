#!/usr/bin/env python3
"""Build the small sentence-transformers model directories of tests/data/models/, and record what
sentence-transformers itself returns for them.

    target/bench-venv/bin/python scripts/make-model-fixtures.py [--out tests/data/models]

Runs offline with the bench venv (torch, sentence-transformers, transformers, tokenizers; `make
bench` installs it). Deterministic: the corpus, the vocabularies (see wordpiece_vocab and
unigram_vocab: the WordPiece and Unigram trainers of `tokenizers` are not) and the weights (random,
from fixed seeds) come out the same on every run, so re-running rewrites identical files (checked:
two runs, same sha256 for every file). Everything it owns under --out is removed first.

Each model is tiny (hidden size 32, 4 heads, 2 layers, intermediate 64, vocabularies of 600),
float32 safetensors. The transformer shared by several BERT variants lives in `_shared-bert/`, and
those variants point at it with a relative symlink `0_Transformer -> ../_shared-bert` (modules.json
path "0_Transformer"); the others have their transformer at the root (path ""), as real models do.
For every model directory NAME the reference is NAME.json beside it, written by
scripts/make-reference.py (--fixture), and README.md says what each one covers.
"""

import argparse
import base64
import importlib.util
import json
import math
import os
import random
import shutil
import sys
import tempfile

# One rayon thread: the trainers of `tokenizers` then give the same vocabulary every run.
os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers  # noqa: E402
from tokenizers import pre_tokenizers, processors, trainers  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SENTENCES = os.path.join(ROOT, "tests", "data", "reference", "sentences.json")

sys.dont_write_bytecode = True  # no scripts/__pycache__ from importing make-reference.py
_spec = importlib.util.spec_from_file_location("make_reference", os.path.join(HERE, "make-reference.py"))
make_reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_reference)

torch.set_num_threads(2)

HIDDEN, HEADS, LAYERS, INTERMEDIATE = 32, 4, 2, 64

# ---------------------------------------------------------------------------------------------
# Corpus

SUBJECTS = ["dog", "cat", "teacher", "student", "baker", "sailor", "scientist", "programmer",
            "musician", "farmer", "child", "doctor", "driver", "speaker", "investor", "chef",
            "gardener", "pilot", "writer", "runner"]
VERBS = [("walk", "walked"), ("cook", "cooked"), ("paint", "painted"), ("sell", "sold"),
         ("buy", "bought"), ("fix", "fixed"), ("study", "studied"), ("carry", "carried"),
         ("watch", "watched"), ("find", "found"), ("open", "opened"), ("clean", "cleaned"),
         ("visit", "visited"), ("measure", "measured"), ("explain", "explained"),
         ("describe", "described"), ("share", "shared"), ("test", "tested"), ("build", "built"),
         ("play", "played")]
OBJECTS = ["bread", "pizza", "report", "boat", "garden", "guitar", "engine", "market", "recipe",
           "speech", "map", "book", "camera", "bicycle", "coffee", "letter", "window", "computer",
           "sandwich", "ticket", "presentation", "audience", "stock", "ocean", "loaf"]
PLACES = ["in the park", "at the market", "near the harbour", "in the kitchen", "on the bridge",
          "at the station", "in the library", "by the river", "on the mountain", "in the office",
          "at the bakery", "under the sea"]
TIMES = ["on Monday", "every morning", "last winter", "after lunch", "before sunset",
         "at midnight", "during the storm", "in the spring", "yesterday", "this week"]
ADJECTIVES = ["quick", "lazy", "old", "young", "bright", "quiet", "famous", "careful", "hungry",
              "tired", "happy", "small", "large", "modern", "ancient", "simple", "great", "deep"]
TOPICS = ["Dog Walking", "Public Speaking", "Interest Rates", "Baking Bread", "Deep Sea Life",
          "Python Code", "Climate Change", "Street Food", "Mountain Hiking", "Jazz Music"]

TEMPLATES = [
    "The {adj} {subj} {past} the {obj} {place} {time}.",
    "A {subj} {past} a {adj} {obj} {place}.",
    "Why does the {subj} {base} the {obj} {time}?",
    "How to {base} a {obj} in {n} simple steps",
    "{Time}, the {subj} {past} {n} {obj}s {place}.",
    "The Secrets of {topic}",
    "The Art of {topic}: {n} Lessons",
    "{topic} for the {adj} {subj}",
    "Everyone wants to {base} the {obj}, but only the {subj} knows how.",
    "query: how do I {base} a {adj} {obj}?",
    "passage: The {subj} {past} the {obj} {place}, and it was {adj}.",
    "My {subj} said the {obj} costs {n}.{m} dollars {time}.",
]

MULTILINGUAL = [
    # French
    "Le chien court dans le jardin.", "La boulangère vend du pain frais chaque matin.",
    "Nous avons visité le musée près de la rivière.", "Où se trouve la gare, s'il vous plaît ?",
    "Il fait beau aujourd'hui, allons à la plage.", "Le café est très chaud, attention !",
    "Les élèves étudient la géographie et l'histoire.", "Ça coûte combien, ce gâteau à la crème ?",
    "Un café crème et une crêpe, s'il vous plaît.", "La forêt est très belle en été.",
    # Spanish
    "El perro camina por el parque cada mañana.", "¿Dónde está la estación de tren?",
    "La niña comió una manzana y un pan.", "Mañana vamos a la playa con mis amigos.",
    "El café de Colombia es muy famoso.", "Los científicos estudian el océano profundo.",
    "¡Qué día tan bonito!", "Mi abuela cocina paella los domingos.",
    # German
    "Der Hund läuft durch den Park.", "Die Bäckerei öffnet um sieben Uhr.",
    "Wir fahren morgen mit dem Zug nach München.", "Das Wetter ist heute schön und warm.",
    "Die Größe des Hauses überrascht alle.", "Ich trinke gern Kaffee mit Milch.",
    "Über die Straße geht ein älterer Mann.", "Fußball ist in Deutschland sehr beliebt.",
    # Portuguese, Italian
    "O cachorro está dormindo no sofá.", "A padaria abre às seis horas.",
    "Você já visitou São Paulo?", "A praia estava cheia no verão.",
    "Il cane dorme sotto il tavolo.", "La pizza napoletana è buonissima.",
    "Andiamo al mercato domani mattina.", "Perché il cielo è blu?",
    # Chinese
    "我喜欢在公园里散步。", "今天天气很好。", "他每天早上喝咖啡。", "我们明天去北京。",
    "这本书非常有意思。", "狗在公园里跑。", "面包是最古老的食物之一。", "海洋覆盖了地球表面的大部分。",
    "我的朋友是一名医生。", "请问火车站在哪里？", "我喜欢遛狗。", "在公园里遛狗很开心。",
    # Japanese
    "東京は日本の首都です。", "私は毎朝コーヒーを飲みます。", "犬が公園で走っています。",
    "この本はとても面白いです。", "明日は雨が降るでしょう。", "日本の食べ物はおいしいです。",
    "駅はどこですか。", "京都は古い都です。",
    # Korean
    "한국어 문장도 테스트합니다.", "저는 매일 아침 커피를 마셔요.", "개가 공원에서 뛰어요.",
    "서울은 한국의 수도입니다.", "오늘 날씨가 좋네요.", "이 책은 정말 재미있어요.",
    # Russian, Greek, Arabic
    "Привет, как дела?", "Собака гуляет в парке.", "Москва — столица России.",
    "Я люблю читать книги.", "Сегодня хорошая погода.", "Хлеб — один из древнейших продуктов.",
    "Η γρήγορη καφέ αλεπού.", "Ο σκύλος περπατά στο πάρκο.", "Καλημέρα, τι κάνεις;",
    "Η Αθήνα είναι η πρωτεύουσα της Ελλάδας.",
    "مرحبا بالعالم", "الكلب يمشي في الحديقة.", "القهوة ساخنة جدا.", "أحب قراءة الكتب.",
    # Turkish, Polish, Vietnamese, Hindi
    "Köpek parkta yürüyor.", "Bugün hava çok güzel.", "İstanbul büyük bir şehirdir.",
    "Pies biegnie przez park.", "Zażółć gęślą jaźń.", "Dziękuję bardzo za pomoc.",
    "Con chó đang chạy trong công viên.", "Hôm nay trời đẹp quá.",
    "कुत्ता पार्क में चल रहा है।", "आज मौसम अच्छा है।",
    # Emoji, symbols, code
    "I ❤️ my 🐕", "Good morning ☀️", "Let's go 🚀", "Pizza 🍕 and coffee ☕", "🌳 trees in the park 🌳",
    "x = f(y) ** 2 + 3.14", "https://example.org/index.html?page=2", "email: someone@example.com",
    "ＦＵＬＬＷＩＤＴＨ　ｔｅｘｔ １２３", "ﬁne ﬂowers…", "naïve résumé coöperate",
]


def corpus(reference):
    """The tokenizer training text: the reference sentences, ~360 templated English sentences
    and the multilingual lines (three times, so their characters are not the rarest)."""
    rng = random.Random(20240601)
    lines = list(reference)
    for _ in range(360):
        base, past = rng.choice(VERBS)
        time = rng.choice(TIMES)
        lines.append(
            rng.choice(TEMPLATES).format(
                adj=rng.choice(ADJECTIVES), subj=rng.choice(SUBJECTS), base=base, past=past,
                obj=rng.choice(OBJECTS), place=rng.choice(PLACES), time=time,
                Time=time[0].upper() + time[1:], topic=rng.choice(TOPICS),
                n=rng.randint(2, 99), m=rng.randint(10, 99),
            )
        )
    lines += MULTILINGUAL * 3
    return lines


def many_sentences(reference, n=2000):
    """~2000 varied sentences, 1 to ~150 words, for the large-input check."""
    rng = random.Random(777)
    words = sorted({w for line in corpus(reference) for w in line.split()})
    cjk = [s for s in MULTILINGUAL if any("\u3040" <= c <= "\u9fff" for c in s)]
    # characters no tokenizer saw in training: [UNK] / <unk> / bytes
    unseen = ["ภาษาไทย", "Ærøskøbing", "ℵ₀", "🦄", "ǅemal", "Ꭰ", "ᚠᚢᚦ"]
    out = []
    for i in range(n):
        r = rng.random()
        if r < 0.65:
            k = rng.randint(1, 10)
        elif r < 0.9:
            k = rng.randint(11, 40)
        elif r < 0.98:
            k = rng.randint(41, 100)
        else:
            k = rng.randint(101, 150)
        toks = [rng.choice(words) for _ in range(k)]
        if rng.random() < 0.1:
            toks.insert(rng.randint(0, len(toks)), rng.choice(cjk))
        if rng.random() < 0.03:
            toks.insert(rng.randint(0, len(toks)), rng.choice(unseen))
        sep = " " if rng.random() < 0.9 else rng.choice(["  ", "\t", " \n "])
        s = sep.join(toks)
        s = s[0].upper() + s[1:] if rng.random() < 0.5 else s
        s += rng.choice(["", ".", ".", "?", "!"])
        out.append(s)
    return out


# ---------------------------------------------------------------------------------------------
# Tokenizers

# A small SentencePiece "precompiled charsmap" (the normalizer real XLM-R tokenizer.json files
# carry): fullwidth ASCII -> ASCII, ideographic/no-break space, tab, newline and CR -> space,
# the fi/fl ligatures, ellipsis -> "...", circled digits, superscript 2/3, (TM), a few
# letter + combining mark -> precomposed, halfwidth ideographic full stop. Compiled once by
# sentencepiece 0.2.3 (SentencePieceTrainer.train(..., normalization_rule_tsv=<those 113 rules>),
# ModelProto.normalizer_spec.precompiled_charsmap), kept here so this script needs no sentencepiece.
_CHARSMAP = (
    "AAgAAAAgAAAJCQAACgUAAAAAAIDMCAIADRkAAIAFAADLAACAzAACAIENAADOAACAzDwCAIgFAADRAACAzCQCAIh9AADUAACA"
    "KAAAgCoAAICmHQAAHgAAgKINAABuAACAJgAAgKA9AAChIQAAoiEAAIAcAgCAfQAAgv0AAIEFAACVAACAoI0AAIBQAgCYAACA"
    "AgAAgAQAAICESAIArOQCAAYAAIAIAACACgAAgAwAAIAOAACAEAAAgBIAAIAUAACAFgAAgJEgAgAYAACAso0AALOFAAAaAACA"
    "HAAAgLzcAAC9AAQAIgAAgCQAAIAsAACALgAAgDAAAIAyAACANAAAgDYAAIA4AACAOgAAgDwAAIA+AACAQAAAgEIAAIBEAACA"
    "RgAAgEgAAIBKAACATAAAgE4AAIBQAACAUgAAgFQAAIBWAACAWAAAgFoAAIBcAACAXgAAgGAAAIBiAACAZAAAgGYAAIBoAACA"
    "agAAgGwAAIBxAACAcwAAgHUAAIB3AACAeQAAgHsAAIB9AACAfwAAgIEAAICDAACAhQAAgIcAAIBvgAIAiQAAgGGEAgCLAACA"
    "jQAAgI8AAIBlpAIAkQAAgJMAAICbAACAnQAAgJ8AAIChAACAowAAgKUAAICnAACAqQAAgKsAAICtAACArwAAgLEAAICzAACA"
    "dfwCALUAAIC3AACAgY0CALkAAICDlQIAgp0CAIW1AgCEtQIAh7UCAIa1AgCJlQIAiJUCAIuVAgCKlQIAjeECAIzxAgCP2QIA"
    "jukCAJEdAgCQoQIAkwECAJIJAgCVvQIAlL0CAJetAgCWrQIAmZ0CAJidAgCbbQMAmm0DAJ19AwCcfQMAn20DAJ5tAwChnQMA"
    "oJ0DAKOtAwCirQMApb0DAKS9AwCnrQMApq0DAKmdAwConQMAq+0DAKrtAwCt/QMArP0DAK/tAwCu7QMAsZ0DALCdAwCzrQMA"
    "sq0DALW9AwC0vQMAt60DALatAwC5nQMAuJ0DALttAwC6bQMAvX0DALx9AwC/bQMAvm0DALsAAIC9AACAwAAAAL8AAIDGAAAA"
    "wQAAgMMAAIDFAAAAygAAAMUAAIDCKAEAxwAAgMkAAIDXAACAzAAAAM0AAADSAAAA0wAAANAAAADRAAAA1gAAANcAAADUAAAA"
    "1QAAANoAAADbAAAA2AAAANkAAADeAAAA3wAAANwAAADdAAAA4gAAAOMAAADgAAAA4QAAAOYAAADnAAAA5AAAAO+0AQDqAAAA"
    "6wAAAOIsAQDjwAEA7gAAAO8AAADsAAAA7QAAAPIAAADzAAAA8AAAAPEAAAD2AAAA9wAAAPQAAAD1AAAA+gAAAPsAAAD4AAAA"
    "+QAAAP4AAAD/AAAA/AAAAP0AAAAAAAAAAQAAAAIAAAADAAAABAAAAAUAAAAGAAAABwAAAAgAAAAJAAAACgAAAAsAAAAMAAAA"
    "DQAAAA4AAAAPAAAAEAAAABEAAAASAAAAEwAAABQAAAAVAAAAFgAAABcAAAAYAAAAGQAAABoAAAAbAAAAHAAAAB0AAAAeAAAA"
    "HwAAACAAAAAhAAAAIgAAACMAAAAkAAAAJQAAACYAAAAnAAAAKAAAACkAAAAqAAAAKwAAACwAAAAtAAAALgAAAC8AAAAwAAAA"
    "MQAAADIAAAAzAAAANAAAADUAAAA2AAAANwAAADgAAAA5AAAAOgAAADsAAAA8AAAAPQAAAD4AAAA/AAAAQAAAAEEAAABCAAAA"
    "QwAAAEQAAABFAAAARgAAAEcAAABIAAAASQAAAEoAAABLAAAATAAAAE0AAABOAAAATwAAAFAAAABRAAAAUgAAAFMAAABUAAAA"
    "VQAAAFYAAABXAAAAWAAAAFkAAABaAAAAWwAAAFwAAABdAAAAXgAAAF8AAABgAAAAYQAAAGIAAABjAAAAZAAAAGUAAABmAAAA"
    "ZwAAAGgAAABpAAAAagAAAGsAAABsAAAAbQAAAG4AAABvAAAAcAAAAHEAAAByAAAAcwAAAHQAAAB1AAAAdgAAAHcAAAB4AAAA"
    "eQAAAHoAAAB7AAAAfAAAAH0AAAB+AAAAfwAAAIAAAACBAAAAggAAAIMAAACEAAAAhQAAAIYAAACHAAAAiAAAAIkAAACKAAAA"
    "iwAAAIwAAACNAAAAjgAAAI8AAACQAAAAkQAAAJIAAACTAAAAlAAAAJUAAAChbQUAlwAAAJgAAACZAAAAmgAAAJsAAACcAAAA"
    "nQAAAJ4AAACfAAAAl4EFAJaBBACVdQcAlHUHAJNhBwCSeQcAkXEHAJB5BwCoAAAAnpUFAJ2FBQCciQUAm6kFAJqhBQCZtQUA"
    "mLkFAIcBBwCGeQcAhXEHAIR9BwCDfQcAgn0HAIF5BwCARQcAjwEHAI45BwCNMQcAjDkHAIshBwCKOQcAiTEHAIg5BwDAAAAA"
    "wQAAAMIAAADDAAAAxAAAAMUAAADGAAAAxwAAAMgAAADJAAAAygAAAMsAAADMAAAAzQAAAM4AAADPAAAA0AAAANEAAADSAAAA"
    "0wAAANQAAADVAAAA1gAAANcAAADYAAAA2QAAANoAAADbAAAA3AAAAN0AAADeAAAA3wAAAOAAAADhAAAA4gAAAOMAAADkAAAA"
    "5QAAAOYAAADnAAAA6AAAAOkAAADqAAAA6wAAAOwAAADtAAAA7gAAAO8AAADwAAAA8QAAAPIAAADzAAAA9AAAAPUAAAD2AAAA"
    "9wAAAPgAAAD5AAAA+gAAAPsAAAD8AAAA/QAAAP4AAAD/AAAAIAAhACIAIwAkACUAJgAnACgAKQAqACsALAAtAC4ALi4uAC8A"
    "MAAxADIAMwA0ADUANgA3ADgAOQA6ADsAPAA9AD4APwBAAEEAQgBDAEQARQBGAEcASABJAEoASwBMAE0ATgBPAFAAUQBSAFMA"
    "VABUTQBVAFYAVwBYAFkAWgBbAFwAXQBeAF8AYABhAGIAYwBkAGUAZgBmaQBmbABnAGgAaQBqAGsAbABtAG4AbwBwAHEAcgBz"
    "AHQAdQB2AHcAeAB5AHoAewB8AH0AfgDDoADDqQDDtgDDvADjgIIA"
)


# The `tokenizers` WordPiece and Unigram trainers do not give the same vocabulary in two processes
# (Rust HashMaps with random seeds decide ties: the "##" symbols get their ids in hash order, the
# Unigram EM sums in hash order). Its BPE trainer is deterministic when every initial symbol is a
# plain character (it sorts its alphabet), so WordPiece vocabularies are learned by the BPE trainer
# with each continuation character moved to a private-use plane (which is what the WordPiece
# trainer does with "##" prefixes), and the Unigram vocabulary by a small EM below.
_PUA = 0xF0000


VOCAB_SIZE = 600
MIN_CHAR = 4  # characters seen fewer times in the corpus are left out of the vocabularies


def rare_chars(words):
    """The characters seen fewer than MIN_CHAR times in `words` (normalized, pre-tokenized)."""
    from collections import Counter

    freq = Counter(c for w in words for c in w)
    return {c for c, f in freq.items() if f < MIN_CHAR}


def wordpiece_vocab(lines, lowercase, specials, vocab_size=VOCAB_SIZE):
    """A WordPiece vocabulary, as tokenizers' WordPieceTrainer learns it, deterministically.
    Words with a rare character are left out (WordPiece makes the whole word [UNK])."""
    norm = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                      lowercase=lowercase)
    pre = pre_tokenizers.BertPreTokenizer()
    split = [[w for w, _ in pre.pre_tokenize_str(norm.normalize_str(line))] for line in lines]
    rare = rare_chars(w for ws in split for w in ws)
    text = []
    for ws in split:
        words = []
        for w in ws:
            assert all(ord(c) < 0x20000 for c in w), w
            if not rare.intersection(w):
                words.append(w[0] + "".join(chr(_PUA + ord(c)) for c in w[1:]))
        text.append(" ".join(words))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=specials,
                                  show_progress=False)
    tok.train_from_iterator(text, trainer)

    def back(t):
        if t in specials:
            return t
        plain = "".join(chr(ord(c) - _PUA) if ord(c) >= _PUA else c for c in t)
        return "##" + plain if ord(t[0]) >= _PUA else plain

    vocab = [back(t) for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    assert len(set(vocab)) == len(vocab)
    return vocab


def unigram_vocab(lines, normalizer, pre_tokenizer, size, max_len=12):
    """SentencePiece-style Unigram training, small and deterministic: seed pieces are the
    substrings (up to max_len) seen at least twice, plus every character; EM (forward-backward
    over each word's lattice) re-estimates log probabilities; the pieces with the lowest expected
    counts are pruned (a quarter at a time) down to `size`. Characters are always kept."""
    from collections import Counter

    words = Counter()
    for line in lines:
        for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line)):
            words[w] += 1
    # Rare characters are left out (they become <unk>), and so are the words that have one.
    rare = rare_chars(w for w, c in words.items() for _ in range(c))
    words = sorted((w, c) for w, c in words.items() if not rare.intersection(w))
    chars = sorted({c for w, _ in words for c in w})
    sub = Counter()
    for w, c in words:
        for i in range(len(w)):
            for j in range(i + 2, min(len(w), i + max_len) + 1):
                sub[w[i:j]] += c
    seeds = sorted(((p, f) for p, f in sub.items() if f >= 2), key=lambda pf: (-pf[1] * len(pf[0]), pf[0]))
    seeds = seeds[: 8 * size]
    total = sum(f for _, f in seeds) + sum(c * len(w) for w, c in words)
    char_freq = Counter()
    for w, c in words:
        for ch in w:
            char_freq[ch] += c
    logp = {p: math.log(f / total) for p, f in seeds}
    for ch in chars:
        logp[ch] = math.log(char_freq[ch] / total)

    def logsumexp(a, b):
        if a == -math.inf:
            return b
        if b == -math.inf:
            return a
        m = max(a, b)
        return m + math.log(math.exp(a - m) + math.exp(b - m))

    def em():
        counts = dict.fromkeys(logp, 0.0)
        for w, c in words:
            n = len(w)
            alpha = [-math.inf] * (n + 1)
            alpha[0] = 0.0
            for j in range(1, n + 1):
                for i in range(max(0, j - max_len), j):
                    lp = logp.get(w[i:j])
                    if lp is not None and alpha[i] > -math.inf:
                        alpha[j] = logsumexp(alpha[j], alpha[i] + lp)
            beta = [-math.inf] * (n + 1)
            beta[n] = 0.0
            for i in range(n - 1, -1, -1):
                for j in range(i + 1, min(n, i + max_len) + 1):
                    lp = logp.get(w[i:j])
                    if lp is not None and beta[j] > -math.inf:
                        beta[i] = logsumexp(beta[i], lp + beta[j])
            z = alpha[n]
            for i in range(n):
                for j in range(i + 1, min(n, i + max_len) + 1):
                    lp = logp.get(w[i:j])
                    if lp is not None:
                        counts[w[i:j]] += c * math.exp(alpha[i] + lp + beta[j] - z)
        s = sum(counts.values())
        for p in logp:
            logp[p] = math.log(max(counts[p], 1e-3) / s)
        return counts

    while True:
        em()
        counts = em()
        if len(logp) <= size:
            break
        keep = max(size, int(len(logp) * 0.75))
        ranked = sorted((p for p in logp if p not in chars), key=lambda p: (-counts[p], p))
        kept = set(ranked[: keep - len(chars)]) | set(chars)
        for p in list(logp):
            if p not in kept:
                del logp[p]
    em()
    return sorted(((p, round(lp, 6)) for p, lp in logp.items()), key=lambda pl: (-pl[1], pl[0]))


def added(content, lstrip=False, normalized=False):
    return AddedToken(content, single_word=False, lstrip=lstrip, rstrip=False, normalized=normalized, special=True)


def bert_tokenizer_json(vocab, lowercase, trunc_pad=None):
    """tokenizer.json as transformers 4's BertTokenizerFast wrote it."""
    ids = {t: i for i, t in enumerate(vocab)}
    tok = Tokenizer(models.WordPiece(ids, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens([added(t) for t in ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]])
    if trunc_pad:
        tok.enable_truncation(trunc_pad)
        tok.enable_padding(length=trunc_pad, pad_id=ids["[PAD]"], pad_token="[PAD]")
    return tok


def mpnet_tokenizer_json(vocab, trunc_pad=None):
    """tokenizer.json as in sentence-transformers' MPNet models (RobertaProcessing, <s> A </s>)."""
    ids = {t: i for i, t in enumerate(vocab)}
    tok = Tokenizer(models.WordPiece(ids, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.RobertaProcessing(
        ("</s>", ids["</s>"]), ("<s>", ids["<s>"]), trim_offsets=True, add_prefix_space=False
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens(
        [added("<s>"), added("<pad>"), added("</s>"), added("<unk>", normalized=True), added("[UNK]"),
         added("<mask>", lstrip=True)]
    )
    if trunc_pad:
        tok.enable_truncation(trunc_pad)
        tok.enable_padding(length=trunc_pad, pad_id=ids["<pad>"], pad_token="<pad>")
    return tok


def unigram_tokenizer(lines, charsmap, vocab_size=VOCAB_SIZE):
    """An XLM-R style SentencePiece Unigram tokenizer: <s>=0 <pad>=1 </s>=2 <unk>=3 ... <mask>."""
    normalizer = normalizers.Sequence(
        [normalizers.Precompiled(charsmap), normalizers.Replace(Regex(" {2,}"), " ")]
    )
    pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    pieces = unigram_vocab(lines, normalizer, pre_tokenizer, vocab_size - len(specials) - 1)
    vocab = [(t, 0.0) for t in specials] + pieces + [("<mask>", 0.0)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=3, byte_fallback=False))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.add_special_tokens([added("<s>"), added("<pad>"), added("</s>"), added("<unk>"), added("<mask>", lstrip=True)])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)],
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    return tok


def bytelevel_bpe_tokenizer(lines, vocab_size=VOCAB_SIZE):
    """A RoBERTa style byte-level BPE: <s>=0 <pad>=1 </s>=2 <unk>=3 ... <mask>."""
    tok = Tokenizer(
        models.BPE(dropout=None, unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                   fuse_unk=False, byte_fallback=False)
    )
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(lines, trainer)
    tok.add_special_tokens([added("<s>"), added("<pad>"), added("</s>"), added("<unk>"), added("<mask>", lstrip=True)])
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), trim_offsets=True, add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


BERT_SPECIALS = ["[PAD]", "[unused0]", "[unused1]", "[unused2]", "[unused3]", "[unused4]",
                 "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
MPNET_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "[UNK]"]


def bert_tokenizer_config(lowercase=True, say_lowercase=True, max_len=512):
    cfg = {}
    if say_lowercase:
        cfg["do_lower_case"] = lowercase
    cfg.update({
        "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
        "mask_token": "[MASK]", "tokenize_chinese_chars": True, "strip_accents": None,
        "model_max_length": max_len, "tokenizer_class": "BertTokenizer",
    })
    return cfg


BERT_SPECIAL_MAP = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                    "cls_token": "[CLS]", "mask_token": "[MASK]"}
MPNET_TOKENIZER_CONFIG = {
    "do_lower_case": True, "bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>",
    "cls_token": "<s>", "unk_token": "[UNK]", "pad_token": "<pad>", "mask_token": "<mask>",
    "tokenize_chinese_chars": True, "strip_accents": None, "model_max_length": 512,
    "tokenizer_class": "MPNetTokenizer",
}
MPNET_SPECIAL_MAP = {
    "bos_token": "<s>", "eos_token": "</s>", "unk_token": "[UNK]", "sep_token": "</s>",
    "pad_token": "<pad>", "cls_token": "<s>",
    "mask_token": {"content": "<mask>", "single_word": False, "lstrip": True, "rstrip": False, "normalized": False},
}
XLMR_TOKENIZER_CONFIG = {
    "bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>", "cls_token": "<s>",
    "unk_token": "<unk>", "pad_token": "<pad>",
    "mask_token": {"content": "<mask>", "single_word": False, "lstrip": True, "rstrip": False,
                   "normalized": True, "__type": "AddedToken"},
    "model_max_length": 512, "tokenizer_class": "XLMRobertaTokenizer",
}
XLMR_SPECIAL_MAP = {
    "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>",
    "pad_token": "<pad>", "cls_token": "<s>",
    "mask_token": {"content": "<mask>", "single_word": False, "lstrip": True, "rstrip": False, "normalized": True},
}
ROBERTA_TOKENIZER_CONFIG = {
    "errors": "replace", "bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>",
    "cls_token": "<s>", "unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<mask>",
    "add_prefix_space": False, "trim_offsets": True, "model_max_length": 512,
    "tokenizer_class": "RobertaTokenizer",
}
ROBERTA_SPECIAL_MAP = {
    "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>",
    "pad_token": "<pad>", "cls_token": "<s>",
    "mask_token": {"content": "<mask>", "single_word": False, "lstrip": True, "rstrip": False, "normalized": False},
}


# ---------------------------------------------------------------------------------------------
# Files

def write_json(path, obj, compact=False):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        if compact:
            f.write(json.dumps(obj, ensure_ascii=False))
        else:
            f.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_tokenizer(d, tok, config, special_map, vocab_txt=None, bpe_files=False):
    tok.save(os.path.join(d, "tokenizer.json"), pretty=False)
    write_json(os.path.join(d, "tokenizer_config.json"), config, compact=True)
    write_json(os.path.join(d, "special_tokens_map.json"), special_map, compact=True)
    if vocab_txt is not None:
        with open(os.path.join(d, "vocab.txt"), "w", encoding="utf-8") as f:
            f.write("".join(t + "\n" for t in vocab_txt))
    if bpe_files:
        tok.model.save(d)  # vocab.json + merges.txt


def bert_config(vocab_size, max_pos=128, pad_token_id=0):
    return {
        "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1,
        "gradient_checkpointing": False, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
        "hidden_size": HIDDEN, "initializer_range": 0.02, "intermediate_size": INTERMEDIATE,
        "layer_norm_eps": 1e-12, "max_position_embeddings": max_pos, "model_type": "bert",
        "num_attention_heads": HEADS, "num_hidden_layers": LAYERS, "pad_token_id": pad_token_id,
        "position_embedding_type": "absolute", "transformers_version": "4.8.2",
        "type_vocab_size": 2, "use_cache": True, "vocab_size": vocab_size,
    }


def mpnet_config(vocab_size, max_pos):
    return {
        "architectures": ["MPNetForMaskedLM"], "attention_probs_dropout_prob": 0.1,
        "bos_token_id": 0, "eos_token_id": 2, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
        "hidden_size": HIDDEN, "initializer_range": 0.02, "intermediate_size": INTERMEDIATE,
        "layer_norm_eps": 1e-05, "max_position_embeddings": max_pos, "model_type": "mpnet",
        "num_attention_heads": HEADS, "num_hidden_layers": LAYERS, "pad_token_id": 1,
        "relative_attention_num_buckets": 32, "transformers_version": "4.8.2",
        "vocab_size": vocab_size,
    }


def roberta_like_config(model_type, arch, vocab_size, max_pos):
    return {
        "architectures": [arch], "attention_probs_dropout_prob": 0.1, "bos_token_id": 0,
        "eos_token_id": 2, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
        "hidden_size": HIDDEN, "initializer_range": 0.02, "intermediate_size": INTERMEDIATE,
        "layer_norm_eps": 1e-05, "max_position_embeddings": max_pos, "model_type": model_type,
        "num_attention_heads": HEADS, "num_hidden_layers": LAYERS, "pad_token_id": 1,
        "position_embedding_type": "absolute", "transformers_version": "4.8.2",
        "type_vocab_size": 1, "use_cache": True, "vocab_size": vocab_size,
    }


def randomize(module, seed):
    """Weights large enough that attention, positions and every layer matter: N(0, 1/fan_in)
    matrices, N(0, 0.5) embeddings, LayerNorm weights 1 + N(0, 0.1), biases N(0, 0.1), MPNet's
    relative attention bias N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            r = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            low = name.lower()
            if "layernorm" in low or "layer_norm" in low:
                p.copy_(1 + 0.1 * r if name.endswith("weight") else 0.1 * r)
            elif "relative_attention_bias" in name:
                p.copy_(r)
            elif name.endswith("bias"):
                p.copy_(0.1 * r)
            elif "embeddings" in name:
                p.copy_(0.5 * r)
            else:
                p.copy_(r / math.sqrt(p.shape[-1]))


def build_weights(config, seed, model_class, prefix="", position_ids=False, drop=()):
    """Random weights for `config` as `model_class` would save them (float32 safetensors)."""
    torch.manual_seed(seed)
    cfg = dict(config)
    model_type = cfg.pop("model_type")
    for k in ("architectures", "transformers_version", "gradient_checkpointing"):
        cfg.pop(k, None)
    hf_config = transformers.AutoConfig.for_model(model_type, **cfg)
    model = model_class(hf_config)
    randomize(model, seed)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if k not in drop}
    if position_ids:
        state[prefix + "embeddings.position_ids"] = torch.arange(config["max_position_embeddings"]).unsqueeze(0)
    return state


def save_weights(state, path):
    save_file(state, path, metadata={"format": "pt"})
    os.chmod(path, 0o644)  # save_file makes it 0600


def write_transformer(d, config, state, sbert_config=None):
    os.makedirs(d, exist_ok=True)
    write_json(os.path.join(d, "config.json"), config)
    save_weights(state, os.path.join(d, "model.safetensors"))
    if sbert_config is not None:
        write_json(os.path.join(d, "sentence_bert_config.json"), sbert_config)


LEGACY = {
    "Transformer": "sentence_transformers.models.Transformer",
    "Pooling": "sentence_transformers.models.Pooling",
    "Dense": "sentence_transformers.models.Dense",
    "Normalize": "sentence_transformers.models.Normalize",
}
ST2_VERSION = {"__version__": {"sentence_transformers": "2.0.0", "transformers": "4.6.1", "pytorch": "1.8.1"}}


def modules_json(d, entries):
    write_json(os.path.join(d, "modules.json"),
               [{"idx": i, "name": str(i), "path": p, "type": LEGACY.get(t, t)} for i, (t, p) in enumerate(entries)])


def legacy_pooling(d, dim, modes, newer_keys=True, include_prompt=None):
    cfg = {
        "word_embedding_dimension": dim,
        "pooling_mode_cls_token": "cls" in modes,
        "pooling_mode_mean_tokens": "mean" in modes,
        "pooling_mode_max_tokens": "max" in modes,
        "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens" in modes,
    }
    if newer_keys:
        cfg["pooling_mode_weightedmean_tokens"] = "weightedmean" in modes
        cfg["pooling_mode_lasttoken"] = "lasttoken" in modes
    if include_prompt is not None:
        cfg["include_prompt"] = include_prompt
    write_json(os.path.join(d, "config.json"), cfg)


def legacy_dense(d, in_f, out_f, activation, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen) / math.sqrt(in_f)
    b = 0.1 * torch.randn(out_f, generator=gen)
    write_json(os.path.join(d, "config.json"),
               {"in_features": in_f, "out_features": out_f, "bias": True, "activation_function": activation})
    save_weights({"linear.weight": w.contiguous(), "linear.bias": b.contiguous()},
                 os.path.join(d, "model.safetensors"))


def symlink_transformer(d, target="_shared-bert"):
    os.makedirs(d, exist_ok=True)
    os.symlink(os.path.join("..", target), os.path.join(d, "0_Transformer"))


# ---------------------------------------------------------------------------------------------
# The directories

class Built:
    """What the builders share: the trained tokenizers."""

    def __init__(self, reference):
        lines = corpus(reference)
        self.lines = lines
        self.uncased = wordpiece_vocab(lines, True, BERT_SPECIALS)
        self.cased = wordpiece_vocab(lines, False, BERT_SPECIALS)
        mp = wordpiece_vocab(lines, True, MPNET_SPECIALS)
        self.mpnet = mp + ["<mask>"]
        self.unigram = unigram_tokenizer(lines, base64.b64decode(_CHARSMAP))
        self.bpe = bytelevel_bpe_tokenizer(lines)


def bert_transformer(d, b, seed, *, vocab=None, lowercase=True, tok_cfg=None, sbert=None,
                     trunc_pad=None, position_ids=False, json_lowercase=None):
    vocab = vocab or b.uncased
    tok = bert_tokenizer_json(vocab, lowercase if json_lowercase is None else json_lowercase, trunc_pad)
    cfg = bert_config(len(vocab))
    write_transformer(d, cfg, build_weights(cfg, seed, transformers.BertModel, position_ids=position_ids), sbert)
    write_tokenizer(d, tok, tok_cfg if tok_cfg is not None else bert_tokenizer_config(lowercase),
                    BERT_SPECIAL_MAP, vocab_txt=vocab)


def build_shared_bert(out, b):
    bert_transformer(os.path.join(out, "_shared-bert"), b, 1,
                     sbert={"max_seq_length": 64, "do_lower_case": False})


def build_bert_cls(d, b):
    bert_transformer(d, b, 2, sbert={"max_seq_length": 48, "do_lower_case": False},
                     trunc_pad=128, position_ids=True)
    modules_json(d, [("Transformer", ""), ("Pooling", "1_Pooling"), ("Normalize", "2_Normalize")])
    legacy_pooling(os.path.join(d, "1_Pooling"), HIDDEN, {"cls"}, newer_keys=False)
    write_json(os.path.join(d, "config_sentence_transformers.json"), ST2_VERSION)


def shared_variant(d, modes, normalize, st_config=ST2_VERSION, include_prompt=None):
    symlink_transformer(d)
    entries = [("Transformer", "0_Transformer"), ("Pooling", "1_Pooling")]
    if normalize:
        entries.append(("Normalize", "2_Normalize"))
    modules_json(d, entries)
    legacy_pooling(os.path.join(d, "1_Pooling"), HIDDEN, modes, include_prompt=include_prompt)
    if st_config is not None:
        write_json(os.path.join(d, "config_sentence_transformers.json"), st_config)


def build_bert_max(d, b):
    shared_variant(d, {"max"}, False, st_config={**ST2_VERSION, "similarity_fn_name": "dot"})


def build_bert_mean_sqrt(d, b):
    shared_variant(d, {"mean_sqrt_len_tokens"}, False, st_config=None)


def build_bert_weightedmean(d, b):
    shared_variant(d, {"weightedmean"}, True)


def build_bert_lasttoken(d, b):
    shared_variant(d, {"lasttoken"}, False)


def build_bert_legacy_combo(d, b):
    symlink_transformer(d)
    modules_json(d, [("Transformer", "0_Transformer"), ("Pooling", "1_Pooling"), ("Dense", "2_Dense"),
                     ("Normalize", "3_Normalize")])
    legacy_pooling(os.path.join(d, "1_Pooling"), HIDDEN, {"cls", "mean", "max"})
    legacy_dense(os.path.join(d, "2_Dense"), 3 * HIDDEN, 16, "torch.nn.modules.activation.Tanh", 60)
    write_json(os.path.join(d, "config_sentence_transformers.json"), ST2_VERSION)


def build_bert_prompts(d, b):
    shared_variant(
        d, {"mean"}, True, include_prompt=False,
        st_config={
            "__version__": {"sentence_transformers": "3.0.1", "transformers": "4.41.2", "pytorch": "2.3.0"},
            "prompts": {"query": "query: ", "document": "passage: "},
            "default_prompt_name": "query",
            "similarity_fn_name": "cosine",
        },
    )


def build_bert_v6(d, b):
    """Built with the v6 module classes and written by SentenceTransformer.save()."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules.dense import Dense
    from sentence_transformers.base.modules.transformer import Transformer
    from sentence_transformers.sentence_transformer.modules.pooling import Pooling

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "bert")
        bert_transformer(src, b, 7, tok_cfg=bert_tokenizer_config(True, max_len=40))
        torch.manual_seed(7)
        transformer = Transformer(src)
        pooling = Pooling(HIDDEN, pooling_mode=["mean", "cls"])
        dense1 = Dense(2 * HIDDEN, 24, activation_function=torch.nn.Identity())
        dense2 = Dense(24, 16, activation_function=torch.nn.Tanh())
        randomize(dense1, 71)
        randomize(dense2, 72)
        model = SentenceTransformer(modules=[transformer, pooling, dense1, dense2], device="cpu")
        model.save(d, create_model_card=False)
    # The maximum length is tokenizer_config.json's model_max_length alone.
    sb = os.path.join(d, "sentence_bert_config.json")
    with open(sb) as f:
        cfg = json.load(f)
    if "max_seq_length" in cfg:
        del cfg["max_seq_length"]
        write_json(sb, cfg)
    # Paths of the temporary directory must not leak into the files.
    for name in os.listdir(d):
        p = os.path.join(d, name)
        if os.path.isfile(p) and name.endswith(".json"):
            with open(p, encoding="utf-8") as f:
                text = f.read()
            if tmp in text:
                raise SystemExit(f"{p} names the temporary directory {tmp}")


def build_plain(d, b):
    bert_transformer(d, b, 10)


def build_bert_lowercase(d, b):
    bert_transformer(d, b, 11, vocab=b.cased, lowercase=False,
                     sbert={"max_seq_length": 128, "do_lower_case": True})
    modules_json(d, [("Transformer", ""), ("Pooling", "1_Pooling"), ("Normalize", "2_Normalize")])
    legacy_pooling(os.path.join(d, "1_Pooling"), HIDDEN, {"mean"})
    write_json(os.path.join(d, "config_sentence_transformers.json"), ST2_VERSION)


def build_bert_stale(d, b):
    # tokenizer.json: a cased BertNormalizer (lowercase false); tokenizer_config.json says nothing
    # about do_lower_case, so transformers 5 rebuilds the normalizer with its default (True).
    bert_transformer(d, b, 12, vocab=b.cased, lowercase=False,
                     tok_cfg=bert_tokenizer_config(say_lowercase=False),
                     sbert={"max_seq_length": 128, "do_lower_case": False})
    modules_json(d, [("Transformer", ""), ("Pooling", "1_Pooling"), ("Normalize", "2_Normalize")])
    legacy_pooling(os.path.join(d, "1_Pooling"), HIDDEN, {"mean"})
    write_json(os.path.join(d, "config_sentence_transformers.json"), ST2_VERSION)


def build_mpnet(d, b):
    vocab = b.mpnet
    cfg = mpnet_config(len(vocab), max_pos=258)
    write_transformer(d, cfg, build_weights(cfg, 20, transformers.MPNetModel, position_ids=True),
                      {"max_seq_length": 200, "do_lower_case": False})
    write_tokenizer(d, mpnet_tokenizer_json(vocab, trunc_pad=128), MPNET_TOKENIZER_CONFIG,
                    MPNET_SPECIAL_MAP, vocab_txt=vocab)
    modules_json(d, [("Transformer", ""), ("Pooling", "1_Pooling"), ("Normalize", "2_Normalize")])
    legacy_pooling(os.path.join(d, "1_Pooling"), HIDDEN, {"mean"}, newer_keys=False)
    write_json(os.path.join(d, "config_sentence_transformers.json"), ST2_VERSION)


def build_xlmr(d, b):
    tok = b.unigram
    cfg = roberta_like_config("xlm-roberta", "XLMRobertaModel", tok.get_vocab_size(), max_pos=130)
    write_transformer(d, cfg, build_weights(cfg, 30, transformers.XLMRobertaModel),
                      {"max_seq_length": 64, "do_lower_case": False})
    write_tokenizer(d, tok, XLMR_TOKENIZER_CONFIG, XLMR_SPECIAL_MAP)
    modules_json(d, [("Transformer", ""), ("Pooling", "1_Pooling"), ("Normalize", "2_Normalize")])
    legacy_pooling(os.path.join(d, "1_Pooling"), HIDDEN, {"cls"})
    write_json(os.path.join(d, "config_sentence_transformers.json"), ST2_VERSION)


def build_roberta(d, b):
    tok = b.bpe
    cfg = roberta_like_config("roberta", "RobertaForMaskedLM", tok.get_vocab_size(), max_pos=130)
    # Saved as RobertaForMaskedLM saves: "roberta."-prefixed encoder, lm_head (decoder tied, left out).
    state = build_weights(cfg, 40, transformers.RobertaForMaskedLM,
                          drop=("lm_head.decoder.weight", "lm_head.decoder.bias"))
    write_transformer(d, cfg, state, {"max_seq_length": 128, "do_lower_case": False})
    write_tokenizer(d, tok, ROBERTA_TOKENIZER_CONFIG, ROBERTA_SPECIAL_MAP, bpe_files=True)
    modules_json(d, [("Transformer", ""), ("Pooling", "1_Pooling")])
    legacy_pooling(os.path.join(d, "1_Pooling"), HIDDEN, {"mean"})
    write_json(os.path.join(d, "config_sentence_transformers.json"), ST2_VERSION)


def build_bert_xlmr_tokenizer(d, b):
    tok = b.unigram
    cfg = bert_config(tok.get_vocab_size(), max_pos=128, pad_token_id=0)
    write_transformer(d, cfg, build_weights(cfg, 50, transformers.BertModel),
                      {"max_seq_length": 128, "do_lower_case": False})
    write_tokenizer(d, tok, XLMR_TOKENIZER_CONFIG, XLMR_SPECIAL_MAP)
    modules_json(d, [("Transformer", ""), ("Pooling", "1_Pooling"), ("Normalize", "2_Normalize")])
    legacy_pooling(os.path.join(d, "1_Pooling"), HIDDEN, {"mean"})
    write_json(os.path.join(d, "config_sentence_transformers.json"), ST2_VERSION)


# name, builder, what it covers (README), encode the many sentences too
DIRS = [
    ("bert-cls", build_bert_cls, "BERT, transformer at the root, classic type paths, legacy Pooling config (4 flags) with CLS, Normalize; max_seq_length 48 from sentence_bert_config.json; weights carry an int64 `embeddings.position_ids`; tokenizer.json has truncation 128 and fixed padding 128 baked in (as real ones do) that must be ignored", False),
    ("bert-max", build_bert_max, "max pooling, no Normalize; `similarity_fn_name` \"dot\" in config_sentence_transformers.json; transformer via `0_Transformer -> ../_shared-bert` (max_seq_length 64 from `_shared-bert/sentence_bert_config.json`)", False),
    ("bert-mean-sqrt", build_bert_mean_sqrt, "mean_sqrt_len_tokens pooling, no Normalize, no config_sentence_transformers.json at all; shared transformer", False),
    ("bert-weightedmean", build_bert_weightedmean, "weightedmean pooling + Normalize; shared transformer", False),
    ("bert-lasttoken", build_bert_lasttoken, "lasttoken pooling (the [SEP]), no Normalize; shared transformer", False),
    ("bert-legacy-combo", build_bert_legacy_combo, "legacy flags cls + mean + max all true (concatenated in the legacy order cls, max, mean: 96), Dense 96 -> 16 tanh (`2_Dense/config.json` + `2_Dense/model.safetensors`, keys linear.weight/linear.bias), Normalize; shared transformer", False),
    ("bert-v6", build_bert_v6, "written by sentence-transformers 6.2's `SentenceTransformer.save()` (v6 type paths, `pooling_mode` [\"mean\", \"cls\"] in that non-legacy order, Dense 64 -> 24 identity then Dense 24 -> 16 tanh, no Normalize), files as transformers 5 saves them; the maximum length (40) only in tokenizer_config.json `model_max_length`", False),
    ("bert-prompts", build_bert_prompts, "prompts {query: \"query: \", document: \"passage: \"}, default_prompt_name query (so plain encode prepends \"query: \"), Pooling include_prompt false (the prompt's tokens, [CLS] included, are left out of the mean), mean + Normalize; shared transformer; also the 2000-sentence check", True),
    ("bert-lowercase", build_bert_lowercase, "cased tokenizer (tokenizer_config do_lower_case false, tokenizer.json BertNormalizer lowercase false) with `do_lower_case: true` in sentence_bert_config.json: sentence-transformers puts a Lowercase normalizer in front", False),
    ("bert-plain", build_plain, "plain transformers directory (no modules.json, no sentence_bert_config.json): sentence-transformers serves it with mean pooling, no Normalize; max length = min(tokenizer model_max_length 512, max_position_embeddings 128)", False),
    ("bert-stale-tokenizer", build_bert_stale, "tokenizer.json (cased vocabulary, BertNormalizer lowercase false) disagrees with tokenizer_config.json, which says nothing of do_lower_case: transformers 5's BertTokenizer rebuilds the normalizer from tokenizer_config with its default do_lower_case=True, so the ids are those of a lowercasing, accent-stripping tokenizer, not of tokenizer.json as saved", False),
    ("mpnet", build_mpnet, "MPNet (config architectures MPNetForMaskedLM, weights unprefixed, int64 position_ids, relative position buckets), MPNetTokenizer (<s>=0 <pad>=1 </s>=2 <unk>=3 [UNK]=4 ... <mask> last; RobertaProcessing), transformer at the root, max_seq_length 200 (positions start at padding_idx + 1 = 2; max_position_embeddings 258), tokenizer.json with truncation/padding 128 baked in, mean + Normalize; the long sentences pass 128 tokens, so relative distances reach the last bucket; also the 2000-sentence check", True),
    ("xlmr", build_xlmr, "XLM-RoBERTa, SentencePiece-style Unigram tokenizer (<s>=0 <pad>=1 </s>=2 <unk>=3 ... <mask> last; normalizer Precompiled charsmap + Replace(\" {2,}\", \" \"), Metaspace), transformer at the root, CLS pooling + Normalize, max_seq_length 64", False),
    ("roberta", build_roberta, "RoBERTa with a byte-level BPE tokenizer (vocab.json/merges.txt too), mean pooling, no Normalize, max_seq_length 128 = max_position_embeddings 130 - 2; weights saved as RobertaForMaskedLM does (\"roberta.\" prefix, lm_head.* tensors, no pooler)", False),
    ("bert-xlmr-tokenizer", build_bert_xlmr_tokenizer, "BERT architecture with an XLMRobertaTokenizer (as paraphrase-multilingual-MiniLM-L12-v2): no token_type_ids from the tokenizer, mean + Normalize, max_seq_length 128", False),
]


# ---------------------------------------------------------------------------------------------

def check_weights(name, d):
    """The weights sentence-transformers loaded are the ones in the files."""
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(d, device="cpu")
    loaded = model[0].auto_model.state_dict()
    tdir = make_reference.transformer_dir(d)
    saved = load_file(os.path.join(tdir, "model.safetensors"))
    prefix = getattr(model[0].auto_model, "base_model_prefix", "") + "."
    matched = 0
    for k, v in saved.items():
        key = k[len(prefix):] if k.startswith(prefix) else k
        if key in loaded:
            if not torch.equal(loaded[key].to(v.dtype), v):
                raise SystemExit(f"{name}: {k} differs once loaded")
            matched += 1
    missing = [k for k in loaded if k not in {(s[len(prefix):] if s.startswith(prefix) else s) for s in saved}
               and not k.startswith("pooler.")]
    if missing:
        raise SystemExit(f"{name}: not in the file: {missing}")
    return matched


def readme(out, versions, results):
    v = versions
    lines = [
        "# Small sentence-transformers models, with sentence-transformers' own answers",
        "",
        "Made by `scripts/make-model-fixtures.py` (regenerate: "
        "`target/bench-venv/bin/python scripts/make-model-fixtures.py`; deterministic, the same files every run). "
        f"Versions: python {v['python']}, torch {v['torch']}, sentence-transformers {v['sentence_transformers']}, "
        f"transformers {v['transformers']}, tokenizers {v['tokenizers']}, numpy {v['numpy']}.",
        "",
        "Each model is tiny and random (hidden 32, 4 heads, 2 layers, intermediate 64, vocabularies of 600 "
        "learned from the reference sentences plus ~650 generated English/multilingual ones: WordPiece and byte-level "
        "BPE by the BPE trainer of `tokenizers`, the Unigram one by a small EM in the script, since the WordPiece and "
        "Unigram trainers of `tokenizers` give other vocabularies in every process; characters seen fewer than 4 times "
        "are left out, so [UNK] happens in many-sentences.json), float32 safetensors; tokenizer.json files written "
        "by `tokenizers` as transformers 4 / the original converters laid them out (bert-v6's by transformers 5). `NAME.json` beside each directory is written by `scripts/make-reference.py --fixture` "
        "from `SentenceTransformer(NAME)`: dimension, max_seq_length, similarity_fn_name, prompts, "
        "default_prompt_name, normalized, the module classes, the 41 sentences of `../reference/sentences.json`, "
        "the token ids the transformer receives during `encode` (with the default prompt, if any) and the untruncated "
        "counts, `encode(sentences)` as users call it, for models with prompts the same under each prompt and with "
        "none (`prompt=\"\"`), and `tokenizer_json_mismatch`: the sentences whose ids by tokenizer.json as saved "
        "(the `tokenizers` library, truncated at max_seq_length) differ from the ones the transformer receives. "
        "`many` (mpnet, bert-prompts): every 10th embedding of the 2000 sentences of `many-sentences.json`, all "
        "encoded in one call.",
        "",
        "`_shared-bert/` is no fixture of its own: the BERT transformer (with its `sentence_bert_config.json`: "
        "max_seq_length 64) that `bert-max`, `bert-mean-sqrt`, `bert-weightedmean`, `bert-lasttoken`, "
        "`bert-legacy-combo` and `bert-prompts` reach through the relative symlink `0_Transformer -> ../_shared-bert`.",
        "",
        "| directory | covers | dim | max len | tokenizer.json differs on |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, _, what, _ in DIRS:
        r = results[name]
        mism = r["tokenizer_json_mismatch"]
        lines.append(
            f"| `{name}` | {what} | {r['dimension']} | {r['max_seq_length']} | "
            f"{len(mism)} of {r['n']} sentences |"
        )
    lines += ["", "## How sentence-transformers / transformers loaded them", ""]
    lines += NOTES
    with open(os.path.join(out, "README.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


NOTES = []  # filled by main() from what it observed


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "tests", "data", "models"))
    args = parser.parse_args()
    out = args.out

    with open(SENTENCES) as f:
        reference = json.load(f)

    # Clear what this script owns.
    os.makedirs(out, exist_ok=True)
    owned = ["_shared-bert", "many-sentences.json", "README.md"] + [n for n, *_ in DIRS] + [f"{n}.json" for n, *_ in DIRS]
    for name in owned:
        p = os.path.join(out, name)
        if os.path.islink(p) or os.path.isfile(p):
            os.remove(p)
        elif os.path.isdir(p):
            shutil.rmtree(p)

    b = Built(reference)
    many = many_sentences(reference)
    write_json(os.path.join(out, "many-sentences.json"), many)
    # one sentence a line, like the reference files
    with open(os.path.join(out, "many-sentences.json"), "w", encoding="utf-8") as f:
        f.write("[\n" + ",\n".join(" " + json.dumps(s, ensure_ascii=False) for s in many) + "\n]\n")

    build_shared_bert(out, b)
    results = {}
    for name, build, _, with_many in DIRS:
        d = os.path.join(out, name)
        build(d, b)
        n = check_weights(name, d)
        res, _, _ = make_reference.record(
            d, reference, name=name, fixture=True,
            many=("many-sentences.json", many) if with_many else None,
        )
        make_reference.write(res, os.path.join(out, f"{name}.json"))
        results[name] = res
        print(f"{name}: dimension {res['dimension']}, max_seq_length {res['max_seq_length']}, "
              f"{n} tensors checked, tokenizer.json differs on {len(res['tokenizer_json_mismatch'])} sentences",
              file=sys.stderr)
    observe(out, results, b)
    readme(out, make_reference.versions(), results)
    for top, dirs, files in os.walk(out):
        for f in files:
            if not os.path.islink(os.path.join(top, f)):
                os.chmod(os.path.join(top, f), 0o644)


def shape(obj):
    """A tokenizer pipeline part, short: long strings (the charsmap) and id maps elided."""
    if isinstance(obj, dict):
        return {k: shape(v) for k, v in obj.items() if k not in ("special_tokens",)}
    if isinstance(obj, list):
        return [shape(v) for v in obj]
    if isinstance(obj, str) and len(obj) > 40:
        return f"<{len(obj)} chars>"
    return obj


def first_mismatch(d, model, result, i):
    from tokenizers import Tokenizer as Tok

    tok = Tok.from_file(os.path.join(make_reference.transformer_dir(d), "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(model.max_seq_length)
    sentence = result["sentences"][i]
    saved = tok.encode(sentence)
    used = result["input_ids_truncated"][i]
    shown = json.dumps(sentence, ensure_ascii=False)
    return (f"{shown[:60]}{'...' if len(shown) > 60 else ''}: tokenizer.json {saved.tokens[:8]}, "
            f"in use {model.tokenizer.convert_ids_to_tokens(used[:8])}")


def observe(out, results, b):
    """What the README says about loading, checked here rather than asserted from memory."""
    from sentence_transformers import SentenceTransformer

    NOTES.clear()
    for name in ["bert-cls", "bert-stale-tokenizer", "bert-lowercase", "mpnet", "xlmr", "roberta", "bert-xlmr-tokenizer",
                 "bert-v6"]:
        d = os.path.join(out, name)
        model = SentenceTransformer(d, device="cpu")
        tok = model.tokenizer
        backend = tok.backend_tokenizer
        with open(os.path.join(make_reference.transformer_dir(d), "tokenizer.json"), encoding="utf-8") as f:
            saved = json.load(f)
        got = json.loads(backend.to_str())
        diffs = [k for k in ("normalizer", "pre_tokenizer", "post_processor", "decoder") if got.get(k) != saved.get(k)]
        desc = "; ".join(f"{k}: saved `{shape(saved.get(k))}`, in use `{shape(got.get(k))}`" for k in diffs)
        kept = [k for k in ("truncation", "padding") if saved.get(k) is not None]
        kept_desc = (
            f" tokenizer.json's {' and '.join(kept)} stay set on the backend tokenizer "
            f"(`{shape(got.get('truncation'))}`, `{shape(got.get('padding'))}`), but sentence-transformers' call "
            "(padding=True, truncation, max_length = max_seq_length) overrides them."
            if kept else ""
        )
        mism = results[name]["tokenizer_json_mismatch"]
        NOTES.append(
            f"- `{name}`: {type(tok).__name__}, whose `__init__` rebuilds normalizer, pre-tokenizer, post-processor and "
            "decoder from tokenizer_config.json (tokenizer.json gives the vocabulary); "
            + (f"the result differs from tokenizer.json as saved: {desc}." if diffs else
               "the result is the same pipeline as tokenizer.json's.")
            + kept_desc
            + f" Ids differ from tokenizer.json's on {len(mism)} of 41 sentences"
            + (f" ({', '.join(map(str, mism[:12]))}{'...' if len(mism) > 12 else ''})" if mism else "")
            + (f"; e.g. {first_mismatch(d, model, results[name], mism[0])}." if mism else ".")
        )


if __name__ == "__main__":
    main()
