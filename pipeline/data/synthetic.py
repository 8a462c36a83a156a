"""The shipped demo data, made by a deterministic generator (the `sample_data` stage writes it).

Korean multiple-choice reading comprehension (지문/질문/선택지 → 정답) in three item types of
graded difficulty, so the README can say honestly what a tiny CPU model learns:

- `explicit`: the passage states the answer number ("이 문제의 정답은 3번이다."). A 2-layer model
  learns to copy it in a few hundred steps.
- `ordinal`: the passage names the answer as an ordinal word ("정답은 세 번째 선택지이다."); the model
  must map the word to the digit. The DAPT corpus carries that mapping.
- `lookup`: no hint; the answer is the option that matches a fact in the passage. Tiny random-init
  models stay near chance here; a real model does not.

Also written: a validation split for SFT's held-out loss (early stopping, best checkpoint), drawn
like eval and sharing no prompt with train or eval, so eval's accuracy stays untouched by model selection;
a raw-text domain corpus for DAPT (same world, same vocabulary), held-out domain text, and a
general-text held-out set on other topics (the forgetting check).

The held-out domain text must not repeat corpus lines, or its perplexity measures memorisation. The
world is small: the answer statements and fine-tuning sentences are ~30 fixed strings that the corpus
contains every one of, so they cannot be held out. Held-out lines are therefore fact sentences from a
held-out-only slice of the (relation, person, value) space (HELDOUT_FACT_SHARE, chosen from the seed):
the corpus never states those facts, so no held-out line is a corpus line, whatever n_domain_lines is.
Their words and phrases do occur in the corpus (same templates): the validate stage reports that
n-gram share.
"""

from __future__ import annotations

import hashlib
import random
import re
from pathlib import Path

from pipeline.config import SampleDataParams
from pipeline.data.readers import write_jsonl

NAMES = ["민수", "지영", "서준", "하은", "도윤", "수아", "예준", "지아", "시우", "서연", "주원", "하린",
         "지호", "윤서", "건우", "채원", "우진", "소율", "현우", "다은"]
CITIES = ["서울", "부산", "대구", "인천", "광주", "대전", "울산", "수원", "춘천", "전주", "제주", "포항"]
FRUITS = ["사과", "배", "포도", "귤", "복숭아", "수박", "딸기", "감", "참외", "자두", "망고", "바나나"]
JOBS = ["교사", "의사", "요리사", "화가", "기자", "농부", "경찰", "간호사", "작가", "가수", "변호사", "목수"]
COLORS = ["빨간색", "파란색", "노란색", "초록색", "보라색", "검은색", "하얀색", "주황색", "분홍색", "회색"]
ORDINALS = ["첫 번째", "두 번째", "세 번째", "네 번째", "다섯 번째", "여섯 번째", "일곱 번째",
            "여덟 번째", "아홉 번째", "열 번째"]

# (attribute values, fact sentence, question) — the world the passages and the domain corpus share.
RELATIONS = [
    (CITIES, "{name}{eun} {value}에 산다.", "{name}{eun} 어디에 사는가?"),
    (FRUITS, "{name}{i} 가장 좋아하는 과일은 {value}{ida}.", "{name}{i} 가장 좋아하는 과일은 무엇인가?"),
    (JOBS, "{name}의 직업은 {value}{ida}.", "{name}의 직업은 무엇인가?"),
    (COLORS, "{name}의 가방은 {value}{ida}.", "{name}의 가방은 무슨 색인가?"),
]

FINETUNING_SENTENCES = [
    "LoRA는 사전 학습된 가중치를 고정하고 저차원 행렬만 학습한다.",
    "QLoRA는 모델을 4비트로 양자화한 뒤 LoRA 어댑터를 학습한다.",
    "nf4는 정규분포를 따르는 가중치에 맞춘 4비트 자료형이다.",
    "이중 양자화는 양자화 상수를 한 번 더 양자화해 메모리를 줄인다.",
    "LLM.int8은 이상치 특징을 16비트로 남기고 나머지를 8비트로 계산한다.",
    "프롬프트 튜닝은 모델을 고정하고 입력 앞의 임베딩만 학습한다.",
    "DAPT는 도메인 말뭉치로 언어 모델을 추가로 사전 학습한다.",
    "TAPT는 과제의 문장으로 언어 모델을 추가로 사전 학습한다.",
    "적대적 학습은 임베딩에 작은 노이즈를 더해 모델을 강건하게 만든다.",
    "어시스턴트 응답에만 손실을 주면 모델은 답하는 법을 배운다.",
]

HELDOUT_FACT_SHARE = 0.2  # of the fact combinations, stated only in the held-out domain text


def heldout_fact(seed: int, relation: int, name: str, value: str) -> bool:
    """Whether this fact belongs to the held-out-only slice (a sha256 of seed and fact: no hash-seed dependence)."""
    digest = hashlib.sha256(f"{seed}|{relation}|{name}|{value}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < HELDOUT_FACT_SHARE * 2**64


GENERAL_SUBJECTS = ["오늘 아침", "지난 주말", "어제 저녁", "내일 오후", "이번 겨울", "작년 여름"]
GENERAL_EVENTS = ["비가 많이 내렸다", "시장에 사람이 붐볐다", "도서관이 일찍 문을 닫았다",
                  "버스가 늦게 도착했다", "공원에서 음악회가 열렸다", "바람이 차갑게 불었다",
                  "새 빵집이 문을 열었다", "강가에 안개가 짙게 꼈다", "기차표가 모두 팔렸다"]
GENERAL_TAILS = ["그래서 모두 집에 일찍 돌아갔다.", "사람들은 우산을 챙겼다.", "아이들은 즐겁게 뛰어놀았다.",
                 "가게 주인은 바쁘게 움직였다.", "거리는 평소보다 조용했다.", "뉴스에서도 그 소식을 전했다."]


def _josa(word: str, with_final: str, without_final: str) -> str:
    """Korean particle after `word`: 은/는, 이/가 depend on whether its last syllable has a final consonant."""
    last = ord(word[-1]) - 0xAC00
    return with_final if 0 <= last < 11172 and last % 28 else without_final


def _fill(template: str, name: str, value: str = "") -> str:
    return template.format(name=name, value=value,
                           eun=_josa(name, "은", "는"), i=_josa(name, "이", "가"), ida=_josa(value, "이다", "다") if value else "")


def make_item(rng: random.Random, index: int, item_type: str, answer: int, num_choices: int) -> dict:
    """One multiple-choice item whose correct option sits at position `answer` (1-based)."""
    people = rng.sample(NAMES, 3)
    rel_idx = rng.randrange(len(RELATIONS))
    values, fact_tpl, question_tpl = RELATIONS[rel_idx]
    picked = rng.sample(values, num_choices)
    facts = []
    for name, value in zip(people, picked):
        facts.append(_fill(fact_tpl, name, value))
    target = people[0]
    correct = picked[0]
    distractors = picked[1:]
    rng.shuffle(distractors)
    choices = distractors[: answer - 1] + [correct] + distractors[answer - 1:]
    rng.shuffle(facts)
    # Filler without digits, so the only number in an explicit item's passage is the answer.
    sentences = facts + [rng.choice([f for f in FINETUNING_SENTENCES if not re.search(r"\d", f)])]
    if item_type == "explicit":
        sentences.append(f"이 문제의 정답은 {answer}번이다.")
    elif item_type == "ordinal":
        sentences.append(f"정답은 {ORDINALS[answer - 1]} 선택지이다.")
    return {
        "id": f"mcq-{index:05d}",
        "type": item_type,
        "passage": " ".join(sentences),
        "question": _fill(question_tpl, target),
        "choices": choices,
        "answer": answer,
    }


def make_items(rng: random.Random, n: int, start: int, mix: dict[str, float], num_choices: int) -> list[dict]:
    """n items; each type gets its share of n, and answers cycle so every position is equally common."""
    counts = {t: int(round(share * n)) for t, share in mix.items()}
    counts[max(counts, key=counts.get)] += n - sum(counts.values())
    items = []
    for item_type, count in counts.items():
        for k in range(count):
            items.append((item_type, k % num_choices + 1))
    rng.shuffle(items)
    return [make_item(rng, start + i, t, a, num_choices) for i, (t, a) in enumerate(items)]


def domain_sentence(rng: random.Random, seed: int) -> str:
    """A sentence of the demo domain: the passages' world, how answers are stated, fine-tuning terms.

    Answer statements repeat their number later in the sentence, so continued pretraining on this
    corpus teaches the model to carry a number forward (and an ordinal word to its number). Facts of
    the held-out-only slice are never drawn (they are `heldout_sentence`'s).
    """
    roll = rng.random()
    k = rng.randrange(5)
    if roll < 0.35:
        while True:
            relation = rng.randrange(len(RELATIONS))
            values, fact_tpl, _ = RELATIONS[relation]
            name, value = rng.choice(NAMES), rng.choice(values)
            if not heldout_fact(seed, relation, name, value):
                return _fill(fact_tpl, name, value)
    if roll < 0.6:
        return rng.choice([f"{ORDINALS[k]} 선택지는 {k + 1}번이다.", f"정답이 {ORDINALS[k]} 선택지이면 {k + 1}번을 고른다."])
    if roll < 0.85:
        return rng.choice([f"이 문제의 정답은 {k + 1}번이다. 그러므로 {k + 1}번을 고른다.",
                           f"정답은 {k + 1}번이라고 적혀 있으니 답은 {k + 1}이다."])
    return rng.choice(FINETUNING_SENTENCES)


def heldout_sentence(rng: random.Random, seed: int) -> str:
    """A held-out domain line: a fact sentence of the held-out-only slice (never a corpus line)."""
    while True:
        relation = rng.randrange(len(RELATIONS))
        values, fact_tpl, _ = RELATIONS[relation]
        name, value = rng.choice(NAMES), rng.choice(values)
        if heldout_fact(seed, relation, name, value):
            return _fill(fact_tpl, name, value)


def general_sentence(rng: random.Random) -> str:
    return f"{rng.choice(GENERAL_SUBJECTS)}에는 {rng.choice(GENERAL_EVENTS)}. {rng.choice(GENERAL_TAILS)}"


def generate(params: SampleDataParams, num_choices: int, seed: int, out_dir: Path) -> dict[str, int]:
    """Write train/validation/eval items and the three text files into out_dir; return row counts."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    train = make_items(rng, params.n_train, 0, params.type_mix, num_choices)
    seen = {(r["passage"], r["question"]) for r in train}
    eval_rows = [r for r in make_items(rng, params.n_eval * 2, params.n_train, params.type_mix, num_choices)
                 if (r["passage"], r["question"]) not in seen]
    # Keep the eval split balanced per type and answer after dropping the (rare) overlaps.
    eval_rows = _balanced_subset(eval_rows, params.n_eval, params.type_mix, num_choices)
    # Validation: drawn after eval (train and eval stay what they were), no prompt of either.
    seen |= {(r["passage"], r["question"]) for r in eval_rows}
    validation = [r for r in make_items(rng, params.n_validation * 2, params.n_train + params.n_eval * 2,
                                        params.type_mix, num_choices)
                  if (r["passage"], r["question"]) not in seen]
    validation = _balanced_subset(validation, params.n_validation, params.type_mix, num_choices)
    write_jsonl(out_dir / "train.jsonl", train)
    write_jsonl(out_dir / "validation.jsonl", validation)
    write_jsonl(out_dir / "eval.jsonl", eval_rows)
    texts = {
        "domain_train.txt": [domain_sentence(rng, seed) for _ in range(params.n_domain_lines)],
        "domain_eval.txt": [heldout_sentence(rng, seed) for _ in range(params.n_heldout_lines)],
        "general_eval.txt": [general_sentence(rng) for _ in range(params.n_heldout_lines)],
    }
    for name, lines in texts.items():
        (out_dir / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"train": len(train), "validation": len(validation), "eval": len(eval_rows),
            **{k: len(v) for k, v in texts.items()}}


def _balanced_subset(rows: list[dict], n: int, mix: dict[str, float], num_choices: int) -> list[dict]:
    counts = {t: int(round(share * n)) for t, share in mix.items()}
    counts[max(counts, key=counts.get)] += n - sum(counts.values())
    picked = []
    for item_type, count in counts.items():
        for answer in range(1, num_choices + 1):
            want = count // num_choices + (1 if answer <= count % num_choices else 0)
            pool = [r for r in rows if r["type"] == item_type and r["answer"] == answer]
            picked.extend(pool[:want])
    return sorted(picked, key=lambda r: r["id"])
