"""NTKDynamicsCallback inside transformers.Trainer and TRL's DPOTrainer on a tiny LlamaForCausalLM
built from a config with an in-memory word-level tokenizer (offline).

Independent checks: with plain SGD (no clipping, constant lr) the real update is
-lr * mean_u grad L(u), so the kernel form built from the batches the callback captured must
equal the exact jvp along the real update; and the first-order predictions must agree with
the re-evaluated change."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")

from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
)

import ntkdyn  # noqa: E402
from ntkdyn.analysis.statistics import pearson  # noqa: E402
from ntkdyn.analysis.summary import summarize_dynamics  # noqa: E402
from ntkdyn.rundir import read_jsonl  # noqa: E402

WORDS = ["<pad>", "<bos>", "<eos>", "<unk>", "yes", "no", "red", "blue", "circle", "square", "a", "the", "is"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM._from_config(config, attn_implementation="eager")


def sequence_logprob(model, batch):
    """sum_t log pi(ids_t | ids_<t): Tensor[B]."""
    logp = torch.log_softmax(model(input_ids=batch["input_ids"]).logits[:, :-1].float(), -1)
    return logp.gather(-1, batch["input_ids"][:, 1:, None])[..., 0].sum(1)


def yes_log_odds(model, batch):
    """logit(yes) - logit(no) after the sequence: Tensor[B]."""
    last = model(input_ids=batch["input_ids"]).logits[:, -1].float()
    return last[:, WORDS.index("yes")] - last[:, WORDS.index("no")]


def probes(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "gen/held_out": (sequence_logprob, {"input_ids": torch.randint(4, len(WORDS), (5, 6), generator=g)}),
        "und/held_out": (yes_log_odds, {"input_ids": torch.randint(4, len(WORDS), (5, 6), generator=g)}),
    }


def lm_per_sample_loss(model, inputs):
    """Per-sample token cross-entropy scaled so that its mean is the Trainer's loss
    (sum of token losses / number of label tokens): Tensor[B]."""
    logits = model(input_ids=inputs["input_ids"]).logits[:, :-1].float()
    labels = inputs["labels"][:, 1:]
    ce = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none", ignore_index=-100)
    return ce.sum(1) * labels.shape[0] / (labels != -100).sum()


def check_rows(out_dir, steps, sgd_tol=1e-3):
    probe_rows = read_jsonl(out_dir / "dynamics.jsonl")
    assert sorted({r["step"] for r in probe_rows}) == sorted(
        {r["step"] for r in read_jsonl(out_dir / "ntk.jsonl")}
    )
    assert sorted({r["step"] for r in probe_rows}) == steps
    assert {r["measurement"] for r in probe_rows} == {"gen", "und"}
    predicted = torch.tensor([r["predicted"] for r in probe_rows])
    observed = torch.tensor([r["observed"] for r in probe_rows])
    sgd = torch.tensor([r["predicted_sgd"] for r in probe_rows])
    features = torch.tensor([r["predicted_features"] for r in probe_rows])
    scale = predicted.abs().max()
    assert scale > 0
    # SGD: the kernel form of the captured batches is the jvp along the real update
    torch.testing.assert_close(sgd, predicted, atol=sgd_tol * scale, rtol=sgd_tol)
    # exact features: <phi, delta> is the jvp
    torch.testing.assert_close(features, predicted, atol=1e-4 * scale, rtol=1e-4)
    # first order agrees with the observed change
    assert pearson(predicted, observed) > 0.99
    assert (predicted - observed).abs().max() < 0.1 * scale
    summary = summarize_dynamics(probe_rows)
    assert summary["gen"]["pearson"] > 0.99 and summary["und"]["pearson"] > 0.99
    return probe_rows


def test_callback_in_trainer_with_gradient_accumulation(tmp_path):
    model = tiny_llama()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, len(WORDS), (16, 6), generator=g)
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=4,
        learning_rate=0.01,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    cb = ntkdyn.NTKDynamicsCallback(
        probes=probes(),
        out_dir=tmp_path / "run",
        every=2,
        config=ntkdyn.ProjectionConfig(kind="exact"),
        loss_fn=lm_per_sample_loss,
    )
    trainer.add_callback(cb)
    cb.attach(trainer)
    trainer.train()
    rows = check_rows(tmp_path / "run", [2, 4])
    # both micro-batches of the step (2 x 2 samples) are training samples of the kernel form
    assert max(u for r in rows for _, u, _ in r["top_train"]) == 3


def test_resumed_trainer_continues_the_rows(tmp_path):
    """A trainer killed after its step-2 checkpoint wrote rows up to step 3; resumed from the checkpoint,
    the rows of step 3 are dropped and written again: steps 1..4 once each, as in one uninterrupted run."""
    ids = torch.randint(4, len(WORDS), (8, 6), generator=torch.Generator().manual_seed(0))
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})

    def trained(max_steps, resume=None):
        args = TrainingArguments(
            output_dir=str(tmp_path / "hf"),
            per_device_train_batch_size=2,
            max_steps=max_steps,
            learning_rate=0.01,
            optim="sgd",
            lr_scheduler_type="constant",
            save_strategy="steps",
            save_steps=2,
            report_to="none",
            logging_strategy="no",
            use_cpu=True,
            disable_tqdm=True,
        )
        trainer = Trainer(model=tiny_llama(), args=args, train_dataset=data)
        cb = ntkdyn.NTKDynamicsCallback(
            probes=probes(), out_dir=tmp_path / "run", every=1, config=ntkdyn.ProjectionConfig(kind="exact")
        )
        cb.attach(trainer)
        trainer.train(resume_from_checkpoint=resume)

    trained(3)  # checkpoint-2, then step 3: its rows stand for the work lost in a kill
    assert sorted({r["step"] for r in read_jsonl(tmp_path / "run" / "ntk.jsonl")}) == [1, 2, 3]
    trained(4, resume=str(tmp_path / "hf" / "checkpoint-2"))
    probe_rows = read_jsonl(tmp_path / "run" / "dynamics.jsonl")
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "ntk.jsonl")] == [1, 2, 3, 4]
    assert [r["step"] for r in probe_rows] == sorted(r["step"] for r in probe_rows)
    assert len(probe_rows) == 4 * 10  # 5 gen + 5 und probes per step, none twice


def test_callback_without_attach_fails_clearly(tmp_path):
    model = tiny_llama()
    ids = torch.randint(4, len(WORDS), (4, 6))
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        max_steps=1,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.add_callback(ntkdyn.NTKDynamicsCallback(probes=probes(), out_dir=tmp_path / "run", every=1))
    with pytest.raises(RuntimeError, match="attach"):
        trainer.train()


BETA = 0.5


def dpo_per_sample_loss(model, inputs):
    """-log sigmoid(beta * (chosen log-ratio - rejected log-ratio)) per pair: Tensor[B]. The batch is
    [chosen; rejected] (TRL's collator); each half runs through the model on its own so that every
    forward has the B rows of the output."""
    ids, mask, completion = inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"]
    half = ids.shape[0] // 2

    def logps(rows: slice) -> torch.Tensor:
        logits = model(input_ids=ids[rows], attention_mask=mask[rows]).logits[:, :-1].float()
        token = torch.log_softmax(logits, -1).gather(-1, ids[rows, 1:, None])[..., 0]
        return (token * completion[rows, 1:]).sum(1)

    chosen, rejected = logps(slice(0, half)), logps(slice(half, None))
    margin = (chosen - inputs["ref_chosen_logps"]) - (rejected - inputs["ref_rejected_logps"])
    return -F.logsigmoid(BETA * margin)


def dpo_dataset() -> datasets.Dataset:
    """Eight prompt/chosen/rejected rows for TRL's DPOTrainer."""
    prompts = ["a red circle", "the blue square", "a blue circle", "the red square"] * 2
    return datasets.Dataset.from_dict(
        {
            "prompt": prompts,
            "chosen": [" is yes", " is red", " yes", " circle"] * 2,
            "rejected": [" is no", " no no", " blue", " square is"] * 2,
        }
    )


def dpo_config(tmp_path, **options) -> trl.DPOConfig:
    """TRL's DPOConfig of these tests: 4 steps of 4 pairs at lr 0.01, constant schedule, precomputed
    reference log-probabilities, on the CPU, nothing saved or logged; ``options`` override or add."""
    return trl.DPOConfig(
        **{
            "output_dir": str(tmp_path / "dpo"),
            "per_device_train_batch_size": 4,
            "max_steps": 4,
            "learning_rate": 0.01,
            "lr_scheduler_type": "constant",
            "beta": BETA,
            "precompute_ref_log_probs": True,
            "report_to": "none",
            "save_strategy": "no",
            "logging_strategy": "no",
            "use_cpu": True,
            "disable_tqdm": True,
            **options,
        }
    )


def test_callback_in_trl_dpo_trainer(tmp_path):
    model = tiny_llama()
    tokenizer = tiny_tokenizer()
    data = dpo_dataset()
    args = dpo_config(tmp_path, optim="sgd", max_grad_norm=0.0)
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    cb = ntkdyn.NTKDynamicsCallback(
        probes=probes(),
        out_dir=tmp_path / "run",
        every=1,
        config=ntkdyn.ProjectionConfig(kind="exact"),
        loss_fn=dpo_per_sample_loss,
    )
    cb.attach(trainer)
    trainer.train()
    # DPOConfig trains under bf16 autocast by default: the real update is the bf16 gradient, the kernel
    # form uses fp32 features, hence the looser tolerance; probes are measured in fp32 regardless
    assert args.bf16
    check_rows(tmp_path / "run", [1, 2, 3, 4], sgd_tol=0.02)


def test_callback_splits_trl_dpo_adamw_steps_and_logs_to_the_trainer(tmp_path):
    """TRL's DPOTrainer with its default optimizer (torch's fused AdamW), weight decay and an active
    clip: the callback splits every step by its one source, the parts sum to the exact first-order
    change, the Adam-aware kernel of the captured batches equals the current step's part, and the
    per-branch scalars reach the trainer's own log history."""
    model = tiny_llama()
    tokenizer = tiny_tokenizer()
    data = dpo_dataset()
    args = dpo_config(
        tmp_path,
        weight_decay=0.1,
        max_grad_norm=0.05,
        bf16=False,  # the real update and the kernel's features in the same precision
    )
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    cb = ntkdyn.NTKDynamicsCallback(
        probes=probes(),
        out_dir=tmp_path / "run",
        every=2,
        config=ntkdyn.ProjectionConfig(kind="exact"),
        loss_fn=dpo_per_sample_loss,
        source="dpo",
    )
    cb.attach(trainer)
    trainer.train()
    optimizer = trainer.optimizer.optimizer
    assert type(optimizer) is torch.optim.AdamW and cb.split is not None and cb.split.last_parts is not None
    assert cb.split.last_parts.coefficients["model.norm.weight"].clip < 1  # the clip was active
    rows = read_jsonl(tmp_path / "run" / "dynamics.jsonl")
    assert sorted({r["step"] for r in rows}) == [2, 4]
    for r in rows:
        parts = r["predicted_by_source"]
        assert set(parts) == {"dpo/current", "dpo/momentum", "weight_decay", "rounding"}
        scale = sum(abs(v) for v in parts.values())
        without_rounding = sum(
            v for k, v in parts.items() if k != "rounding"
        )  # the split alone, without rounding
        assert without_rounding == pytest.approx(r["predicted"], abs=1e-4 * scale)
        assert abs(parts["rounding"]) < 1e-4 * scale
        assert r["predicted_current"] == parts["dpo/current"]
        assert r["predicted_kernel"] == pytest.approx(r["predicted_current"], abs=1e-4 * scale)
        assert all(source == "dpo" for source, _, _ in r["top_train"])
    logged = [entry for entry in trainer.state.log_history if "dynamics/gen/predicted_kernel" in entry]
    assert [entry["step"] for entry in logged] == [2, 4]
    step_4 = [r for r in rows if r["step"] == 4 and r["branch"] == "und"]
    assert logged[1]["dynamics/und/dpo/momentum"] == pytest.approx(
        sum(r["predicted_by_source"]["dpo/momentum"] for r in step_4) / len(step_4)
    )
