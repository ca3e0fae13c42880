"""app.py, the Gradio page, served for real on 127.0.0.1 and driven through gradio_client."""

import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import REPO, TINY_MODEL, run_script

# a training run and a web server, started once for the module's tests: one xdist worker runs them all
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("app")]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory, shakespeare_shards, hellaswag_dir):
    """A tiny run's log folder and the app serving it: (client, log dir, url)."""
    pytest.importorskip("gradio")
    from gradio_client import Client

    log_dir = str(tmp_path_factory.mktemp("app") / "log")
    proc = run_script("train_gpt2.py", "--data_dir", shakespeare_shards, "--log_dir", log_dir, *TINY_MODEL,
                      "-B", 4, "-T", 32, "--total_batch_size", 256, "--max_steps", 6, "--warmup_steps", 1,
                      "--max_lr", 3e-3, "--eval_every", 5, "--val_steps", 2, "--hellaswag_limit", 8, "--no-sample")
    assert proc.returncode == 0, proc.stderr[-3000:]
    port = free_port()
    out = open(os.path.join(os.path.dirname(log_dir), "app.txt"), "w")
    app = subprocess.Popen([sys.executable, os.path.join(REPO, "app.py"), "--log_dir", log_dir, "--device", "cpu",
                            "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
                           env=dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1"))
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while True:
        assert app.poll() is None, open(out.name).read()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.time() < deadline, "the app did not start serving"
            time.sleep(0.5)
    yield Client(url, verbose=False), log_dir, url
    app.terminate()
    app.wait(timeout=30)


def sample_py(model, prompt, n, seed):
    proc = run_script("sample.py", "-m", model, "--prompt", prompt, "--num_samples", 1, "--max_new_tokens", n,
                      "--seed", seed, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split("--- sample 0\n", 1)[1][:-1]  # print's newline off


def test_before_and_after_training_side_by_side_equal_sample_py(served):
    client, log_dir, _ = served
    final = os.path.join(log_dir, "model_00005.pt")
    prompt = "The king said"
    shown, texts = client.predict([final + "@init", final], "", prompt, 20, 1.0, 50, 7, api_name="/compare")
    assert set(texts) == {final + "@init", final}
    before, after = texts[final + "@init"], texts[final]
    assert before["text"] != after["text"] and all(t["text"].startswith(prompt) for t in (before, after))
    assert before["text"] == sample_py(final + "@init", prompt, 20, 7)
    assert after["text"] == sample_py(final, prompt, 20, 7)
    assert after["about"].startswith("step 5 | 1,280 tokens seen | val loss ") and "| HellaSwag " in after["about"]
    assert "initial weights" in before["about"]
    assert shown.count('class="continuation"') == 2


def test_the_initial_weights_are_the_runs_own(served, shakespeare_shards):
    """PATH@init is the model the run evaluated at step 0: the same val loss on the same val batches."""
    import torch

    from conftest import read_log
    from sample import load_model
    from train_gpt2 import DataLoaderLite

    _, log_dir, _ = served
    model = load_model(os.path.join(log_dir, "model_00005.pt@init"), "cpu")
    val = DataLoaderLite(4, 32, 0, 1, "val", shakespeare_shards)
    with torch.no_grad():
        loss = sum(model(*val.next_batch())[1].item() for _ in range(2)) / 2
    assert f"{loss:.4f}" == f"{read_log(os.path.join(log_dir, 'log.txt'))['val'][0]:.4f}"


def test_bad_inputs_give_their_messages_in_the_page(served, tmp_path):
    from gradio_client.exceptions import AppError

    client, log_dir, _ = served
    final = os.path.join(log_dir, "model_00005.pt")
    corrupt = tmp_path / "model_00001.pt"
    corrupt.write_bytes(b"PK\x03\x04 not a checkpoint")
    cases = [
        (([final], "", "", 8, 1.0, 50, 1), "the prompt is empty"),
        (([final], "", "Hi", 100000, 1.0, 50, 1), "length must be a whole number of tokens from 1 to 512"),
        (([final], "", "Hi", 8, 0.0, 50, 1), "temperature must be above 0"),
        (([], "", "Hi", 8, 1.0, 50, 1), "pick at least one model"),
        (([final], str(tmp_path / "missing.pt"), "Hi", 8, 1.0, 50, 1), "missing.pt does not exist"),
        (([final], str(corrupt), "Hi", 8, 1.0, 50, 1), "is not a readable train_gpt2.py checkpoint"),
    ]
    for args, message in cases:
        with pytest.raises(AppError, match=message):
            client.predict(*args, api_name="/compare")
    # the page's number fields and JSON cannot carry a NaN; the check behind them refuses one all the same
    import app

    assert app.check_settings("Hi", 8, float("nan"), 50, 1) == "temperature must be a number, got nan"


def test_without_gradio_it_is_one_line(tmp_path):
    code = "import sys; sys.modules['gradio'] = None; import app; app.main(['--log_dir', 'nowhere'])"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0 and proc.stderr.strip() == \
        "app.py: error: the app needs Gradio, which is not installed: pip install gradio"
