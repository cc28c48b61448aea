"""Appendices A2 and A2b (edm_lit.checkpoints): official pickles loaded safely, our format, downloads, `edm-lit convert`."""
import hashlib
import http.server
import io
import copy
import collections
import json
import os
import pickle
import resource
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import types
import zipfile

import pytest
import torch

from edm_lit import checkpoints
from edm_lit.checkpoints import (NETWORK_CLASSES, CheckpointError, download, load_network, load_official_snapshot,
                                 network_config, read_official_pickle, save_network)
from edm_lit.cli import main
from edm_lit.course import official_layout_pickle
from edm_lit.loss import EDMLoss
from edm_lit.precond import EDMPrecond, VEPrecond, VPPrecond, iDDPMPrecond



@pytest.fixture(autouse=True)
def time_limit():
    """Every test here ends in bounded time: a hang (a FIFO, a bomb) becomes a TimeoutError via SIGALRM."""
    if not hasattr(signal, "SIGALRM"):  # not on Windows
        yield
        return

    def expire(signum, frame):
        raise TimeoutError("the test ran for more than 120 s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def refused(load, match, seconds=5.0) -> str:
    """load() raises a CheckpointError matching `match` within `seconds`; returns its message."""
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=match) as info:
        load()
    assert time.perf_counter() - start < seconds, f"refusal took {time.perf_counter() - start:.1f} s"
    return str(info.value)


@pytest.fixture()
def marker(tmp_path):
    """A file that code from a checkpoint would create; it must never appear."""
    path = tmp_path / "marker"
    yield path
    assert not path.exists()


def trojan(marker) -> str:
    return f"open({str(marker)!r}, 'w').write('pwned')\n"  # as module_src: the official loader would exec it


@pytest.fixture(scope="module")
def official(ref):
    net = EDMPrecond(**ref["kwargs"]).eval().requires_grad_(False)
    net.load_state_dict(ref["state_dict"], strict=True)
    return net


@pytest.fixture()
def snapshot_pkl(tmp_path, official):
    path = tmp_path / "network-snapshot-000000.pkl"
    data = dict(ema=official, loss_fn=EDMLoss(), augment_pipe=None, dataset_kwargs=dict(path="x.zip", use_labels=True))
    path.write_bytes(official_layout_pickle(data))
    return path


def outputs(net, ref):
    with torch.no_grad():
        return [net(ref["x"], ref["sigma"], ref["class_labels"]), net(ref["x"], ref["sigma"], None),
                net(ref["x"], ref["sigma"], ref["class_labels"], augment_labels=ref["augment_labels"])]


def test_official_layout_snapshot_loads(snapshot_pkl, ref):
    raw = read_official_pickle(snapshot_pkl)
    assert set(raw) == {"ema", "loss_fn", "augment_pipe", "dataset_kwargs"}
    net = load_network(snapshot_pkl)
    assert type(net) is EDMPrecond and not net.training and not any(p.requires_grad for p in net.parameters())
    for got, key in zip(outputs(net, ref), ["out", "out_class_labels_none", "out_with_augment_labels"]):
        assert ((got - ref[key]).abs().max() / ref[key].abs().max()).item() <= 1e-5
    snap = load_official_snapshot(snapshot_pkl)
    assert snap["loss_fn"].class_name == "EDMLoss" and snap["loss_fn"].state["P_mean"] == -1.2
    assert snap["dataset_kwargs"] == dict(path="x.zip", use_labels=True) and snap["augment_pipe"] is None


def test_bare_network_pickle_and_numpy_scalars(tmp_path, official, ref):
    """A pickled network without the snapshot dict; NumPy scalars in a state (as the official UNetBlock has)."""
    import numpy as np

    def add_numpy(name, state):
        return dict(state, skip_scale=np.float64(state["skip_scale"])) if name == "UNetBlock" else state
    path = tmp_path / "net.pkl"
    path.write_bytes(official_layout_pickle(official, edit_state=add_numpy))
    assert b"scalar" in path.read_bytes()
    assert torch.equal(outputs(load_network(path), ref)[0], outputs(official, ref)[0])


def small_networks():
    song = dict(model_type="SongUNet", model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])
    ncsn = dict(song, embedding_type="fourier", channel_mult_noise=2, encoder_type="residual", resample_filter=[1, 3, 3, 1])
    adm = dict(model_type="DhariwalUNet", model_channels=64, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])
    return [VPPrecond(16, 3, label_dim=10, **song), VEPrecond(16, 3, **ncsn), iDDPMPrecond(16, 3, label_dim=10, **adm),
            EDMPrecond(16, 3, label_dim=10, augment_dim=9, sigma_data=0.4, **adm), EDMPrecond(16, 3, use_fp16=True, **ncsn)]


def perturbed(net):
    torch.manual_seed(0)
    with torch.no_grad():  # non-zero output layers, so that outputs depend on every weight
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return net.eval()


@pytest.mark.parametrize("index", range(5))
def test_every_precond_through_both_formats(tmp_path, index):
    net = perturbed(small_networks()[index])
    x, sigma = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 3.0])
    labels = torch.eye(10)[:2] if net.label_dim else None
    with torch.no_grad():
        want = net(x, sigma, labels)
    (tmp_path / "a.pkl").write_bytes(official_layout_pickle({"ema": net}))
    for loaded in [load_network(tmp_path / "a.pkl"), load_network(save_network(net, tmp_path / "ours")[0])]:
        assert type(loaded) is type(net) and type(loaded.model) is type(net.model)
        assert network_config(loaded) == network_config(net)
        with torch.no_grad():
            assert torch.equal(loaded(x, sigma, labels), want)


def test_our_format_paths_and_atomicity(tmp_path, official):
    config, weights = save_network(official, tmp_path / "sub" / "model.safetensors")
    header = json.loads(config.read_text())
    assert config.name == "model.json" and weights.name == f"model-{header['weights_sha256'][:16]}.safetensors"
    assert header["format"] == "edm_lit.network" and header["format_version"] == 1 and header["weights"] == weights.name
    assert header["init_kwargs"]["sigma_max"] == {"float": "inf"} and len(header["weights_sha256"]) == 64
    for spelling in [tmp_path / "sub" / "model", config, weights, tmp_path / "sub" / "model.safetensors", tmp_path / "sub"]:
        assert load_network(spelling).sigma_max == float("inf")
    save_network(official, tmp_path / "sub" / "model")  # overwrite in place
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == sorted(["model.json", weights.name])  # no temp files
    with pytest.raises(ValueError, match="net must be one of"):
        save_network(torch.nn.Linear(2, 2), tmp_path / "linear")


def test_malicious_reduce_is_refused_without_effect(tmp_path):
    marker = tmp_path / "marker"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    for payload in [Evil(), {"ema": Evil()}, {"ema": [1, Evil()]}]:
        (tmp_path / "evil.pkl").write_bytes(pickle.dumps(payload))
        with pytest.raises(CheckpointError, match=r"refusing to load '(posix|nt)\.system'.*not an allowed type"):
            load_network(tmp_path / "evil.pkl")
    for func in [eval, exec, getattr, __import__, torch.load, pickle.loads]:
        (tmp_path / "evil.pkl").write_bytes(pickle.dumps(func))
        with pytest.raises(CheckpointError, match="not an allowed type"):
            read_official_pickle(tmp_path / "evil.pkl")
    assert not marker.exists()


def test_malicious_storage_payload_is_refused(tmp_path):
    """The legacy storage bytes are themselves pickles: they go through our _SnapshotUnpickler too, whose only
    globals there are the storage types, so a callable inside them is refused before anything runs."""
    marker = tmp_path / "marker"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    class Storage:
        def __reduce__(self):
            return torch.storage._load_from_bytes, (pickle.dumps(Evil(), protocol=2),)

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"ema": Storage()}))
    with pytest.raises(CheckpointError, match=r"'(posix|nt)\.system'.*not an allowed type"):
        load_network(tmp_path / "evil.pkl")
    assert not marker.exists()


def test_module_src_is_never_executed(tmp_path, official, ref):
    marker = tmp_path / "marker"
    path = tmp_path / "trojan.pkl"
    path.write_bytes(official_layout_pickle({"ema": official}, module_src=f"open({str(marker)!r}, 'w')\n"))
    net = load_network(path)
    assert not marker.exists()
    assert torch.equal(outputs(net, ref)[0], outputs(official, ref)[0])


def test_unknown_persistent_class(tmp_path, official):
    data = official_layout_pickle({"ema": official})
    (tmp_path / "a.pkl").write_bytes(data.replace(b"GroupNorm", b"GroupNarm"))
    with pytest.raises(CheckpointError, match="persistent class 'GroupNarm'.*not an allowed class"):
        load_network(tmp_path / "a.pkl")
    (tmp_path / "v.pkl").write_bytes(official_layout_pickle({"ema": official}, version=7))
    with pytest.raises(CheckpointError, match="version 7"):
        load_network(tmp_path / "v.pkl")
    (tmp_path / "b.pkl").write_bytes(pickle.dumps({"ema": torch.nn.Linear(2, 2)}))
    with pytest.raises(CheckpointError, match="not an allowed type"):
        load_network(tmp_path / "b.pkl")


def test_truncated_files(tmp_path, snapshot_pkl, official):
    data = snapshot_pkl.read_bytes()
    for cut in [0, 10, len(data) // 3, len(data) - 5]:
        (tmp_path / "cut.pkl").write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="not a readable official snapshot.*truncated"):
            load_network(tmp_path / "cut.pkl")
    config, weights = save_network(official, tmp_path / "ours")
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_network(config)
    config.write_text(config.read_text()[:50])
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_network(config)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_network(tmp_path / "nothing.pkl")


def test_wrong_architecture(tmp_path, official):
    def wider(name, state):
        if name == "EDMPrecond":
            state["_init_kwargs"] = dict(state["_init_kwargs"], model_channels=32)
        return state
    (tmp_path / "wide.pkl").write_bytes(official_layout_pickle({"ema": official}, edit_state=wider))
    with pytest.raises(CheckpointError, match=r"does not fit the network: shape mismatches .*model\.map_label\.weight"):
        load_network(tmp_path / "wide.pkl")

    def adm(name, state):
        if name == "EDMPrecond":
            state["_init_kwargs"] = dict(state["_init_kwargs"], model_type="DhariwalUNet")
        return state
    (tmp_path / "adm.pkl").write_bytes(official_layout_pickle({"ema": official}, edit_state=adm))
    with pytest.raises(CheckpointError, match="takes no constructor arguments .*channel_mult_noise"):
        load_network(tmp_path / "adm.pkl")
    # our format: a config that does not match its weights
    config, _ = save_network(official, tmp_path / "ours")
    header = json.loads(config.read_text())
    header["init_kwargs"]["num_blocks"] = 2
    config.write_text(json.dumps(header))
    with pytest.raises(CheckpointError, match="missing keys .*enc.16x16_block1"):
        load_network(config)


def test_missing_key(tmp_path, official):
    def drop_bias(name, state):
        if name == "Linear" and state["in_features"] == 10:  # map_label, the only layer with 10 inputs
            state["_parameters"] = {"weight": state["_parameters"]["weight"]}  # the map_label bias disappears
        return state
    (tmp_path / "a.pkl").write_bytes(official_layout_pickle({"ema": official}, edit_state=drop_bias))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): model\.map_label\.bias"):
        load_network(tmp_path / "a.pkl")
    from safetensors.torch import load_file, save_file
    config, weights = save_network(official, tmp_path / "ours")
    tensors = load_file(weights)
    del tensors["model.map_layer0.bias"]
    save_file(tensors, weights)
    header = json.loads(config.read_text())
    header["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    config.write_text(json.dumps(header))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): model\.map_layer0\.bias"):
        load_network(config)
    (tmp_path / "noema.pkl").write_bytes(official_layout_pickle({"net": official}))
    with pytest.raises(CheckpointError, match="no 'ema' network"):
        load_network(tmp_path / "noema.pkl")


class _Server:
    """A loopback HTTP server for a few files, with Range support; it can cut the first response short, and send
    no Content-Length (length="none", the body then ends when the connection closes) or a malformed one ("bad"),
    and send each body in ten pieces over `slow` seconds."""

    def __init__(self, blob: bytes, cut_first: bool, files=None, length="ok", slow=0.0):
        self.files = files or {"/edm-mini.pkl": blob}
        self.cut_first, self.length, self.slow, self.requests = cut_first, length, slow, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append(self.headers.get("Range"))
                if self.path not in server.files:
                    self.send_error(404)
                    return
                blob = server.files[self.path]
                start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
                body = blob[start:]
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(blob) - 1}/{len(blob)}")
                if server.length == "ok":
                    self.send_header("Content-Length", str(len(body)))
                elif server.length == "bad":
                    self.send_header("Content-Length", "12abc")
                self.end_headers()
                if server.cut_first and len(server.requests) == 1:
                    body = body[: len(body) // 2]  # the connection drops half way
                    self.close_connection = True
                step = max(1, -(-len(body) // 10) if server.slow else len(body))
                for i in range(0, len(body), step):
                    time.sleep(server.slow / 10)
                    self.wfile.write(body[i:i + step])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.url = self.base + "/edm-mini.pkl"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_url_download_resumes_after_a_drop(tmp_path, snapshot_pkl, ref, official):
    server = _Server(snapshot_pkl.read_bytes(), cut_first=True)
    try:
        net = load_network(server.url, cache=tmp_path / "cache")
        assert server.requests[0] is None and server.requests[1].startswith("bytes=") and len(server.requests) == 2
        assert torch.equal(outputs(net, ref)[0], outputs(official, ref)[0])
        cached = list((tmp_path / "cache").iterdir())
        assert len(cached) == 1 and cached[0].name.endswith("-edm-mini.pkl")
        load_network(server.url, cache=tmp_path / "cache")
        assert len(server.requests) == 2  # the second call uses the cache
    finally:
        server.close()


def test_url_resumes_an_earlier_partial_download(tmp_path, snapshot_pkl, monkeypatch):
    blob = snapshot_pkl.read_bytes()
    server = _Server(blob, cut_first=False)
    monkeypatch.setenv("EDM_LIT_CACHE", str(tmp_path / "env-cache"))
    try:
        dest = download(server.url)  # first a complete download, to learn the cache name
        assert dest.parent == tmp_path / "env-cache" and dest.read_bytes() == blob
        part = dest.with_name(dest.name + ".part")
        os.replace(dest, part)
        part.write_bytes(blob[:1234])  # as if an earlier run had stopped here
        assert download(server.url).read_bytes() == blob
        assert server.requests[-1] == "bytes=1234-" and not part.exists()
    finally:
        server.close()


_CONCURRENT_DOWNLOAD = """
import hashlib, pathlib, sys, time
from edm_lit.checkpoints import download
go = pathlib.Path(sys.argv[3])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.005)
path = download(sys.argv[1], cache=sys.argv[2])
print(path, hashlib.md5(path.read_bytes()).hexdigest())
"""


def test_concurrent_downloads_of_one_url(tmp_path, snapshot_pkl):
    """Every rank of a torchrun job calls load_network(url) at once: one process downloads (under a lock),
    the others wait and read the cache; the cache ends with one complete file and nothing else."""
    blob, cache, go = snapshot_pkl.read_bytes(), tmp_path / "cache", tmp_path / "go"
    server = _Server(blob, cut_first=False, slow=1.0)  # a download takes a second: the processes overlap
    env = dict(os.environ, OMP_NUM_THREADS="1")
    try:
        procs = [subprocess.Popen([sys.executable, "-c", _CONCURRENT_DOWNLOAD, server.url, str(cache), str(go)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for _ in range(3)]
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        go.touch()  # all three start downloading together
        results = [p.communicate(timeout=100) for p in procs]
    finally:
        server.close()
    assert all(p.returncode == 0 for p in procs), [err for _, err in results]
    answers = {out.strip() for out, _ in results}
    assert len(answers) == 1 and answers.pop().endswith(hashlib.md5(blob).hexdigest())
    assert server.requests == [None]  # one download, no second or resumed request
    cached = list(cache.iterdir())  # no .part or .lock left behind
    assert len(cached) == 1 and cached[0].name.endswith("-edm-mini.pkl") and cached[0].read_bytes() == blob


def test_offline_and_missing_urls(tmp_path):
    with socket.socket() as s:  # a port on which nobody listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/edm-cifar10-32x32-cond-vp.pkl"
    with pytest.raises(CheckpointError, match=r"could not download http://127\.0\.0\.1.*offline.*local path"):
        load_network(url, cache=tmp_path)
    server = _Server(b"", cut_first=False)
    try:
        with pytest.raises(CheckpointError, match="404"):
            load_network(server.url.replace("edm-mini", "nothing"), cache=tmp_path)
        assert len(server.requests) == 1  # a 404 is not retried
    finally:
        server.close()


def test_cli_convert(tmp_path, snapshot_pkl, ref, official, capsys):
    assert main(["convert", str(snapshot_pkl), str(tmp_path / "out" / "cifar")]) == 0
    assert "cifar.json" in capsys.readouterr().out
    net = load_network(tmp_path / "out" / "cifar.json")
    assert torch.equal(outputs(net, ref)[0], outputs(official, ref)[0])
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(os.system))
    assert main(["convert", str(tmp_path / "evil.pkl"), str(tmp_path / "x")]) == 1
    assert "refusing to load" in capsys.readouterr().err and not (tmp_path / "x.json").exists()


def test_cli_convert_into_an_existing_directory(tmp_path, snapshot_pkl, capsys):
    """`edm-lit convert IN DIR` writes DIR/<name of IN>.json and its weights inside DIR, not beside it."""
    (tmp_path / "converted").mkdir()
    assert main(["convert", str(snapshot_pkl), str(tmp_path / "converted")]) == 0
    out = capsys.readouterr().out
    config = tmp_path / "converted" / "network-snapshot-000000.json"
    assert str(config) in out and config.exists()
    assert len(list((tmp_path / "converted").glob("network-snapshot-000000-*.safetensors"))) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted", snapshot_pkl.name]


def test_cli_convert_checks_the_output_before_loading(tmp_path, monkeypatch, capsys):
    """An output that cannot be written is refused in one line before the source is read (or downloaded)."""
    import edm_lit.checkpoints as checkpoints

    monkeypatch.setattr(checkpoints, "load_network", lambda *a, **k: pytest.fail("loaded before checking the output"))
    (tmp_path / "a-file").write_text("")
    for dst in ["/proc/edm_lit_out", str(tmp_path / "a-file" / "out")]:
        assert main(["convert", "https://example.invalid/edm-cifar10-32x32-cond-vp.pkl", dst]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"edm-lit convert: error: OUT={dst}") and err.count("\n") == 1, err
        assert "cannot" in err


def test_loaded_snapshot_samples_like_official(snapshot_pkl, parity):
    """What a user does with a released snapshot: load_network, then edm_sampler (Chapter 3), here on the
    small official-layout snapshot; the images match the official sampler run with the official network."""
    from edm_lit.samplers import edm_sampler

    ref = parity("sampler_edm.pt")
    net = load_network(snapshot_pkl)
    with torch.no_grad():
        images = edm_sampler(net, ref["latents"], ref["class_labels"])
    assert images.dtype == torch.float64
    assert ((images - ref["det_out"]).abs().max() / ref["det_out"].abs().max()).item() < 1e-6  # 1.6e-7 measured


# ---- one test per class of attack (Appendix A2b, section A2b.4) ----

class _TensorView:
    """Pickles as _rebuild_tensor_v2 over `storage` with any size, stride and offset: what a crafted file can say."""

    def __init__(self, storage, size, stride, offset=0):
        self.storage, self.size, self.stride, self.offset = storage, tuple(size), tuple(stride), offset

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (self.storage, self.offset, self.size, self.stride, False,
                                                 collections.OrderedDict())


def with_map_label(weight, bias):
    """edit_state that replaces the tensors of map_label (the only Linear with 10 inputs)."""
    def edit(name, state):
        if name == "Linear" and state["in_features"] == 10:
            state["_parameters"] = {"weight": weight, "bias": bias}
        return state
    return edit


def test_attack_tensor_outside_its_storage(tmp_path, official, marker):
    """Storages smaller than their tensors, offsets/strides past the end, overlaps, shared elements: refused."""
    weight, bias = official.model.map_label.weight, official.model.map_label.bias
    (rows, cols), n = weight.shape, weight.numel()
    shared = torch.zeros(n)._typed_storage()  # one storage, pickled once, under two tensors
    cases = [  # (weight, bias, what the refusal says)
        (_TensorView(torch.zeros(3)._typed_storage(), (rows, cols), (cols, 1)), bias, "reaches past the end"),
        (_TensorView(torch.zeros(n)._typed_storage(), (rows, cols), (cols, 1), 1), bias, "offset 1.* past the end"),
        (_TensorView(torch.zeros(n)._typed_storage(), (rows, cols), (2 * cols, 1)), bias, "reaches past the end"),
        (_TensorView(torch.zeros(1)._typed_storage(), (rows, cols), (0, 0)), bias, "addresses some elements twice"),
        (_TensorView(torch.zeros(n)._typed_storage(), (rows, cols), (-cols, 1)), bias, "negative"),
        (_TensorView(torch.zeros(n)._typed_storage(), (0, 2**100), (1, 1)), bias, "absurd"),
        (_TensorView(shared, (rows, cols), (cols, 1)), _TensorView(shared, bias.shape, (1,)), "share storage elements"),
    ]
    for w, b, match in cases:
        (tmp_path / "a.pkl").write_bytes(official_layout_pickle({"ema": official}, trojan(marker), with_map_label(w, b)))
        refused(lambda: load_network(tmp_path / "a.pkl"), match)
    # the same file with honest tensors loads: what is refused is only the out-of-bounds description
    honest = (_TensorView(weight.detach().clone()._typed_storage(), (rows, cols), (cols, 1)), bias.detach().clone())
    (tmp_path / "ok.pkl").write_bytes(official_layout_pickle({"ema": official}, trojan(marker), with_map_label(*honest)))
    assert torch.equal(load_network(tmp_path / "ok.pkl").model.map_label.weight, weight)


def _with_kwargs(**changes):
    def edit(name, state):
        if name == "EDMPrecond":
            state["_init_kwargs"] = dict(state["_init_kwargs"], **changes)
        return state
    return edit


def test_attack_tiny_file_asks_for_huge_network(tmp_path, official, marker):
    """Huge kwargs are refused by the limits or by the meta-device shape check, before any real allocation;
    a zip storage blob that would inflate is refused before decompression."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    for changes, match in [(dict(model_channels=10**6), "model_channels=1000000 is beyond the limit"),
                           (dict(num_blocks=10**4), "num_blocks=10000 is beyond the limit"),
                           (dict(channel_mult=[1] * 17), "short list"),
                           (dict(model_channels=4096), r"shape mismatches"),  # within limits: 63e9 weights on meta
                           (dict(model_channels=4096, channel_mult=[4, 4, 4, 4]), r"shape mismatches|wrong architecture")]:
        (tmp_path / "big.pkl").write_bytes(official_layout_pickle({"ema": official}, trojan(marker), _with_kwargs(**changes)))
        assert (tmp_path / "big.pkl").stat().st_size < 2 << 20
        refused(lambda: load_network(tmp_path / "big.pkl"), match, seconds=20)
    config, _ = save_network(official, tmp_path / "ours")  # the same request in our format
    header = json.loads(config.read_text())
    config.write_text(json.dumps(dict(header, init_kwargs=dict(header["init_kwargs"], model_channels=4096))))
    refused(lambda: load_network(config), "shape mismatches", seconds=20)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500 << 10  # < 500 MiB more, not 250 GB

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data/0", bytes(64 << 20))
    bomb = buffer.getvalue()
    assert len(bomb) * 500 < 64 << 20  # expands by a factor of about 1000

    class Storage:
        def __init__(self, blob):
            self.blob = blob

        def __reduce__(self):
            return torch.storage._load_from_bytes, (self.blob,)

    (tmp_path / "zip.pkl").write_bytes(pickle.dumps({"ema": Storage(bomb)}))
    refused(lambda: load_network(tmp_path / "zip.pkl"), "zip format", seconds=2)
    legacy = torch.zeros(4)._typed_storage().__reduce__()[1][0]  # an honest legacy blob ...
    count = legacy.rindex((4).to_bytes(8, "little"))
    lying = legacy[:count] + (10**12).to_bytes(8, "little") + legacy[count + 8:]  # ... that claims 10^12 elements
    (tmp_path / "lie.pkl").write_bytes(pickle.dumps({"ema": Storage(lying)}))
    refused(lambda: load_network(tmp_path / "lie.pkl"), "declares", seconds=2)


def test_attack_one_tensor_fills_many_weights(tmp_path, official, marker, monkeypatch):
    """The memo lets one tensor object, or one module record, fill many entries of the state: a file of a few MiB
    could then ask for a network dozens of times its size. Each tensor may fill one entry only, so such a file is
    refused before any memory is allocated for the network (the official snapshots never share a tensor)."""
    from edm_lit.checkpoints import _build_meta_network, _check_init_kwargs

    def never(*args):
        raise AssertionError("_materialize must not be reached: the network would be allocated")
    monkeypatch.setattr(checkpoints, "_materialize", never)
    kwargs = _check_init_kwargs("EDMPrecond", dict(img_resolution=16, img_channels=3, model_type="SongUNet",
                                                  model_channels=128, channel_mult=[1, 1], num_blocks=32,
                                                  attn_resolutions=[]))
    meta = _build_meta_network("EDMPrecond", kwargs)  # shapes only: the file will hold one tensor per shape
    shared = {}

    def one_per_shape(name, state):
        for group in ("_parameters", "_buffers"):
            if state.get(group):
                state[group] = {k: None if v is None else shared.setdefault((v.shape, v.dtype), torch.zeros(
                    v.shape, dtype=v.dtype)) for k, v in state[group].items()}
        return state
    path = tmp_path / "shared.pkl"
    path.write_bytes(official_layout_pickle({"ema": meta}, trojan(marker), one_per_shape))
    asked = sum(v.numel() * v.element_size() for v in meta.state_dict().values())
    assert asked > 50 * path.stat().st_size  # about 230 MiB of weights from a file of about 4 MiB
    refused(lambda: load_network(path), "is the same tensor as .*one tensor filling several weights", seconds=20)

    def alias_block(name, state):  # the record of one block also stands for another of the same class
        if name == "SongUNet":
            enc = state["_modules"]["enc"]
            alias = torch.nn.ModuleDict({k: enc["16x16_block0"] if k == "8x8_down" else v for k, v in enc.items()})
            state["_modules"] = dict(state["_modules"], enc=alias)
        return state
    (tmp_path / "alias.pkl").write_bytes(official_layout_pickle({"ema": official}, trojan(marker), alias_block))
    refused(lambda: load_network(tmp_path / "alias.pkl"), r"model\.enc\.8x8_down\..* is the same tensor as "
            r"model\.enc\.16x16_block0\.")
    monkeypatch.undo()
    (tmp_path / "ok.pkl").write_bytes(official_layout_pickle({"ema": official}, trojan(marker)))
    assert torch.equal(load_network(tmp_path / "ok.pkl").model.map_label.weight, official.model.map_label.weight)


def test_attack_special_files_and_bombs(tmp_path, official, marker):
    """FIFOs, devices, directories, deep nesting, unhashable or deep keys, lengths past the end, memo sharing."""
    os.mkfifo(tmp_path / "x.pkl")
    refused(lambda: load_network(tmp_path / "x.pkl"), "not a regular file")
    for name in ["zero.json", "zero.pkl"]:
        (tmp_path / name).symlink_to("/dev/zero")
        refused(lambda: load_network(tmp_path / name), "not a regular file")
    config, weights = save_network(official, tmp_path / "pair")
    weights.unlink()
    os.mkfifo(weights)  # the weights file of a pair is a FIFO
    refused(lambda: load_network(config), "not a regular file")
    (tmp_path / "dir.pkl").mkdir()
    refused(lambda: load_network(tmp_path / "dir.pkl"), "directory")

    header = b"\x80\x04"
    bombs = {
        "nested deeper than": header + b"}" + b")" + b"\x85" * 100_000 + b"Ns.",  # a 100000-deep tuple as a dict key
        "dict keys and set members": header + b"}" + b"K\x01\x85Ns.",  # any tuple as a dict key
        "nested deeper": header + b"]" * 100_000 + b"a" * 99_999 + b".",  # 100000-deep lists
        "truncated": header + b"\x8e" + (10**12).to_bytes(8, "little"),  # 1 TB of bytes declared in 11
        "is not allowed": header + b"\x92",  # an opcode the official format does not use (NEWOBJ_EX)
    }
    for match, data in bombs.items():
        (tmp_path / "bomb.pkl").write_bytes(data)
        refused(lambda: load_network(tmp_path / "bomb.pkl"), match)
    dag = ()
    for _ in range(90):
        dag = (dag, dag)  # 90 levels, 2^90 leaves when unfolded: hashing, comparing or printing it never ends
    body = pickle.dumps(dag, protocol=2)[2:-1]  # pushes the tuple, with the memo sharing each level
    persistence = _g("torch_utils.persistence", "_reconstruct_persistent_obj")
    dag_bombs = {  # every place where a file's value could be hashed or printed
        "members must be": b"\x80\x02" + _g("builtins", "set") + b"]" + body + b"a\x85R.",  # set([dag])
        "OrderedDict in the pickle": b"\x80\x02" + _g("collections", "OrderedDict") + b"]" + body + b"K\x01\x86a\x85R.",
        "not two strings": b"\x80\x02" + body + _s("x") + b"\x93.",  # a global whose module name is the dag
        "type a tuple": b"\x80\x02" + persistence + b"}(" + _s("type") + body + _s("class_name") + _s("EDMLoss")
                        + _s("state") + b"}u\x85R.",  # an error message about meta['type']
    }
    for match, data in dag_bombs.items():
        (tmp_path / "dag.pkl").write_bytes(data)
        refused(lambda: load_network(tmp_path / "dag.pkl"), match)
    laughs = []
    for _ in range(60):
        laughs = [laughs, laughs]  # 2^60 leaves when unfolded; the memo keeps the file at 60 levels
    (tmp_path / "laughs.pkl").write_bytes(pickle.dumps(laughs))
    refused(lambda: load_network(tmp_path / "laughs.pkl"), "holds list")


def test_attack_weights_path_traversal(tmp_path, official, marker):
    """`weights` must be a bare file name beside the .json: the same error whether the target exists or not."""
    config, weights = save_network(official, tmp_path / "a" / "model")
    (tmp_path / "secret.safetensors").write_bytes(weights.read_bytes())
    header = json.loads(config.read_text())
    messages = {}
    for name in ["../secret.safetensors", "../absent.safetensors", str(tmp_path / "secret.safetensors"),
                 "/etc/passwd", "..", "a/model.safetensors", ".hidden.safetensors", "x\\..\\y.safetensors", 5, None]:
        config.write_text(json.dumps(dict(header, weights=name)))
        messages[str(name)] = refused(lambda: load_network(config), "must be the bare name of a .safetensors file")
    assert messages["../secret.safetensors"].replace("secret", "?") == messages["../absent.safetensors"].replace("absent", "?")
    # the same from a URL: nothing is requested beyond the .json
    evil = json.dumps(dict(header, weights="../secret.safetensors")).encode()
    files = {"/m/model.json": evil, "/secret.safetensors": weights.read_bytes(),
             "/ok/model.json": json.dumps(header).encode(), f"/ok/{weights.name}": weights.read_bytes()}
    server = _Server(b"", cut_first=False, files=files)
    try:
        refused(lambda: load_network(server.base + "/m/model.json", cache=tmp_path / "cache"), "bare name")
        assert len(server.requests) == 1
        net = load_network(server.base + "/ok/model.json", cache=tmp_path / "cache")  # the honest pair loads
        assert len(server.requests) == 3 and torch.equal(net.model.map_label.weight, official.model.map_label.weight)
    finally:
        server.close()


def _s(text):  # SHORT_BINUNICODE
    return b"\x8c" + bytes([len(text.encode())]) + text.encode()


def _g(module, name):  # STACK_GLOBAL
    return _s(module) + _s(name) + b"\x93"


def test_attack_build_and_callables(tmp_path, official, marker):
    """BUILD may not set attributes (a function's __defaults__, a record's __class__); NEWOBJ/REDUCE only ours;
    a file's model_type must be a network name, not a callable."""
    from edm_lit.checkpoints import _reconstruct_persistent_obj
    record = official_layout_pickle(EDMLoss(), trojan(marker))[:-1]  # a valid record, STOP removed
    persistence = _g("torch_utils.persistence", "_reconstruct_persistent_obj")
    cases = {
        "defaults of a function": b"\x80\x04" + persistence + b"N}" + _s("__defaults__") + b"K\x01\x85s\x86b.",
        "dict on a function": b"\x80\x04" + persistence + b"}" + _s("__defaults__") + b"K\x01\x85sb.",
        "class of a record": record + b"}" + _s("__class__") + _g("collections", "OrderedDict") + b"sb.",
        "state of an OrderedDict": b"\x80\x04" + _g("collections", "OrderedDict") + b")R}" + _s("x") + b"Nsb.",
        "NEWOBJ of a dict type": b"\x80\x04" + _g("collections", "OrderedDict") + b")\x81.",
        "non-dict ModuleDict state": b"\x80\x04" + _g("torch.nn.modules.container", "ModuleDict") + b")\x81K\x01b.",
        "REDUCE of a string": b"\x80\x04" + _s("os") + b")R.",
    }
    for what, data in cases.items():
        (tmp_path / "b.pkl").write_bytes(data)
        refused(lambda: load_network(tmp_path / "b.pkl"), "BUILD|NEWOBJ|REDUCE|not a plain dict")
    assert _reconstruct_persistent_obj.__defaults__ is None and not vars(_reconstruct_persistent_obj)
    for model_type in [torch._utils._rebuild_parameter, "os.system", "Linear", ["SongUNet"]]:
        (tmp_path / "m.pkl").write_bytes(official_layout_pickle({"ema": official}, trojan(marker),
                                                                _with_kwargs(model_type=model_type)))
        refused(lambda: load_network(tmp_path / "m.pkl"), "model_type must be one of")


def test_attack_download_without_or_with_bad_content_length(tmp_path, snapshot_pkl, official, ref):
    """No Content-Length: a truncated body is not cached (nor kept); a complete one is verified, then cached.
    A malformed Content-Length is a clear error."""
    blob, cache = snapshot_pkl.read_bytes(), tmp_path / "cache"
    server = _Server(blob, cut_first=True, length="none")
    try:
        refused(lambda: load_network(server.url, cache=cache), "no Content-Length .* incomplete or corrupt", 30)
        assert list(cache.iterdir()) == []  # nothing cached, nothing kept
        net = load_network(server.url, cache=cache)  # the next answer is complete: verified and cached
        assert torch.equal(outputs(net, ref)[0], outputs(official, ref)[0]) and len(list(cache.iterdir())) == 1
    finally:
        server.close()
    server = _Server(blob, cut_first=False, length="bad")
    try:
        refused(lambda: load_network(server.url, cache=tmp_path / "c2"), "invalid Content-Length '12abc'")
    finally:
        server.close()


def test_attack_malformed_files_give_checkpoint_errors(tmp_path, official):
    """Whatever a file contains, the caller sees a CheckpointError naming the file, never a Python exception."""
    def edited(fn):
        return official_layout_pickle({"ema": official}, edit_state=fn)
    config, _ = save_network(official, tmp_path / "good")
    header = json.loads(config.read_text())
    files = {
        "int.pkl": pickle.dumps(5), "list.pkl": pickle.dumps([1, 2]), "ema-int.pkl": pickle.dumps({"ema": 1}),
        "modules.pkl": edited(lambda n, s: dict(s, _modules=5) if n == "SongUNet" else s),
        "param.pkl": edited(lambda n, s: dict(s, _parameters={"weight": "w"}) if n == "Linear" else s),
        "kwargs.pkl": edited(lambda n, s: dict(s, _init_kwargs=[1]) if n == "EDMPrecond" else s),
        "kwarg-type.pkl": edited(_with_kwargs(model_channels="x")),
        "kwarg-value.pkl": edited(_with_kwargs(model_channels=-3)),
        "trailing.pkl": pickle.dumps(1) + b"junk", "empty.pkl": b"", "proto.pkl": b"\x80\x09",
        "utf8.pkl": b"\x80\x04\x8c\x02\xff\xfe.", "meta.pkl": b"\x80\x04" + _g("torch_utils.persistence",
                                                                              "_reconstruct_persistent_obj") + b"K\x01\x85R.",
        "binary.json": b"\xff\xfe\x00", "array.json": b"[]", "cut.json": b'{"format": ',
        "deep.json": b"[" * 100_000 + b"]" * 100_000, "bigint.json": b'{"format": ' + b"9" * 5000 + b"}",
        "nested-kwargs.json": json.dumps(dict(header, init_kwargs={"channel_mult": [[1]]})).encode(),
        "float-kwargs.json": json.dumps(dict(header, init_kwargs={"sigma_max": {"float": 5}})).encode(),
        "no-weights.json": json.dumps({k: v for k, v in header.items() if k != "weights"}).encode(),
        "bad-hash.json": json.dumps(dict(header, weights_sha256="../x")).encode(),
        "class.json": json.dumps(dict(header, class_name=["EDMPrecond"])).encode(),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        message = refused(lambda: load_network(tmp_path / name), None)
        assert name in message, message
    (tmp_path / "d.json").mkdir()
    refused(lambda: load_network(tmp_path / "d.json"), "directory")
    refused(lambda: load_network(123), "path_or_url must be a path")
    refused(lambda: load_network(str(tmp_path / "a\0.pkl")), "cannot open")
    os.chmod(tmp_path / "int.pkl", 0)
    if os.geteuid() != 0:  # root reads anything
        refused(lambda: load_network(tmp_path / "int.pkl"), "cannot open")


def test_fuzzed_files_give_checkpoint_errors_only(tmp_path, official):
    """Random damage to the structure of a snapshot (opcodes, lengths, storage headers) and to our .json:
    every load either succeeds or raises CheckpointError, quickly; none ends in the catch-all for surprises."""
    import pickletools
    import random

    blob = official_layout_pickle(dict(ema=official, loss_fn=EDMLoss(), dataset_kwargs={"a": 1}))
    spots = []  # the bytes that describe structure: opcodes, short arguments, the headers of storage blobs
    for op, arg, pos in pickletools.genops(blob):
        spots += range(pos, pos + 1 + min(len(arg) if isinstance(arg, (str, bytes)) else 4, 420))
    config, _ = save_network(official, tmp_path / "ours")
    text = config.read_bytes()
    rng = random.Random(0)
    for i in range(120):
        data, path = (bytearray(blob), tmp_path / "f.pkl") if i % 3 else (bytearray(text), config)
        for _ in range(rng.choice([1, 2, 3])):
            where = rng.choice(spots) if i % 3 else rng.randrange(len(data))
            data[where] = rng.choice(b'().tR\x85}]sbu\x93\x81\x94hKN{}[]":,0-.ef/') if rng.random() < 0.5 else rng.randrange(256)
        path.write_bytes(bytes(data[: rng.randrange(len(data))] if rng.random() < 0.1 else data))
        start = time.perf_counter()
        try:
            load_network(path)
        except CheckpointError as e:
            assert "cannot load this checkpoint" not in str(e), str(e)  # each failure is caught where it happens
        assert time.perf_counter() - start < 5


def test_save_network_pair_is_atomic_durable_and_honours_umask(tmp_path, official, monkeypatch):
    for mask, mode in [(0o022, 0o644), (0o077, 0o600)]:
        previous = os.umask(mask)
        try:
            config, weights = save_network(official, tmp_path / f"m{mask:o}")
        finally:
            os.umask(previous)
        assert stat.S_IMODE(config.stat().st_mode) == mode == stat.S_IMODE(weights.stat().st_mode)
    synced, real_fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    first, second = perturbed(copy.deepcopy(official)), perturbed(copy.deepcopy(official))
    with torch.no_grad():
        second.model.map_label.weight.add_(1)
    config, old_weights = save_network(first, tmp_path / "m")
    config, new_weights = save_network(second, tmp_path / "m")  # replace the pair
    assert len(synced) == 8  # each save: the weights, the config and the directory after each rename
    assert sorted(p.name for p in tmp_path.glob("m[.-]*")) == sorted(["m.json", new_weights.name])  # old weights gone
    real_replace = os.replace

    def crash(src, dst):
        if str(dst).endswith(".json"):
            raise OSError("disk full (simulated) before the config was renamed into place")
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        save_network(first, tmp_path / "m")
    monkeypatch.undo()
    loaded = load_network(tmp_path / "m")  # still the complete pair of `second`
    assert torch.equal(loaded.model.map_label.weight, second.model.map_label.weight)
    assert not list(tmp_path.glob(".*.tmp"))


def test_cli_convert_errors_are_one_line(tmp_path, snapshot_pkl, capsys):
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(os.system))
    (tmp_path / "deep.pkl").write_bytes(b"\x80\x04" + b"]" * 100_000 + b"a" * 99_999 + b".")
    os.mkfifo(tmp_path / "fifo.pkl")
    (tmp_path / "zero.json").symlink_to("/dev/zero")
    (tmp_path / "a-file").write_text("")
    cases = [(tmp_path / "evil.pkl", tmp_path / "o"), (tmp_path / "missing.pkl", tmp_path / "o"),
             (tmp_path / "deep.pkl", tmp_path / "o"), (tmp_path / "fifo.pkl", tmp_path / "o"),
             (tmp_path / "zero.json", tmp_path / "o"), (snapshot_pkl, tmp_path / "a-file" / "o")]
    for src, dst in cases:
        assert main(["convert", str(src), str(dst)]) == 1
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith("edm-lit convert: error: "), err
    assert not list(tmp_path.glob("o*"))
    run = subprocess.run([sys.executable, "-c", "import sys; from edm_lit.cli import main; sys.exit(main(sys.argv[1:]))",
                          "convert", str(tmp_path / "evil.pkl"), str(tmp_path / "o")], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 1 and "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(not os.environ.get("EDM_LIT_OFFICIAL"), reason="set EDM_LIT_OFFICIAL to a checkout of NVlabs/edm")
@pytest.mark.parametrize("config", ["edm-songunet", "iddpm-dhariwal"])
def test_snapshot_written_by_the_official_code_loads(tmp_path, config, monkeypatch):
    """Opt-in: the official code (run, not copied; its path in EDM_LIT_OFFICIAL) pickles a snapshot exactly as its
    training loop does; our loader reads it without running it and reproduces the official network's outputs."""
    monkeypatch.syspath_prepend(os.environ["EDM_LIT_OFFICIAL"])
    official = ("dnnlib", "training", "torch_utils")
    for name in [m for m in sys.modules if m.split(".")[0] in official]:
        monkeypatch.delitem(sys.modules, name)  # restored afterwards
    monkeypatch.setattr(sys, "path", list(sys.path))
    try:
        _official_snapshot_roundtrip(tmp_path, config)
    finally:  # drop the official modules this test imported
        for name in [m for m in sys.modules if m.split(".")[0] in official]:
            del sys.modules[name]


def _official_snapshot_roundtrip(tmp_path, config):
    import dnnlib
    from training import augment, loss, networks

    torch.manual_seed(0)
    small = dict(img_resolution=16, img_channels=3, label_dim=10, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])
    net = (networks.EDMPrecond(model_type="SongUNet", model_channels=16, augment_dim=9, **small) if config == "edm-songunet"
           else networks.iDDPMPrecond(model_type="DhariwalUNet", model_channels=64, **small)).eval().requires_grad_(False)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    data = dict(ema=net, loss_fn=loss.EDMLoss(), augment_pipe=augment.AugmentPipe(p=0.12, xflip=1e8),
                dataset_kwargs=dict(dnnlib.EasyDict(path="x.zip", use_labels=True, resolution=16)))
    with open(tmp_path / "network-snapshot-000000.pkl", "wb") as f:
        pickle.dump(data, f)
    ours = load_network(tmp_path / "network-snapshot-000000.pkl")
    x, sigma, labels = torch.randn(2, 3, 16, 16), torch.tensor([0.3, 5.0]), torch.eye(10)[:2]
    with torch.no_grad():
        want, got = net(x, sigma, labels), ours(x, sigma, labels)
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5
