"""Appendix B (edm_lit.checkpoints): official pickles loaded safely, our format, downloads, `edm-lit convert`."""
import hashlib
import http.server
import io
import json
import os
import pickle
import socket
import sys
import threading
import types

import pytest
import torch

from edm_lit import checkpoints
from edm_lit.checkpoints import (NETWORK_CLASSES, CheckpointError, download, load_network, load_official_snapshot,
                                 network_config, read_official_pickle, save_network)
from edm_lit.cli import main
from edm_lit.loss import EDMLoss
from edm_lit.precond import EDMPrecond, VEPrecond, VPPrecond, iDDPMPrecond

PERSISTENT = set(NETWORK_CLASSES) | {"Linear", "Conv2d", "GroupNorm", "UNetBlock", "PositionalEmbedding",
                                     "FourierEmbedding", "EDMLoss"}


def official_layout_pickle(obj, module_src="# module source\n", edit_state=None, version=6) -> bytes:
    """Bytes laid out as torch_utils.persistence writes them: each persistent object becomes
    _reconstruct_persistent_obj(meta) with meta = {type, version, module_src, class_name, state}.
    A stand-in torch_utils.persistence module exists only while pickling."""
    def _reconstruct_persistent_obj(meta):
        raise AssertionError("write only")
    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"

    class Writer(pickle.Pickler):
        def reducer_override(self, o):
            name = type(o).__name__
            if name not in PERSISTENT or not type(o).__module__.startswith("edm_lit"):
                return NotImplemented
            kwargs = network_config(o)["init_kwargs"] if name in NETWORK_CLASSES else {}
            state = dict(o.__dict__, _init_args=(), _init_kwargs=kwargs)
            if edit_state is not None:
                state = edit_state(name, state)
            meta = dict(type="class", version=version, module_src=module_src, class_name=name, state=state)
            return _reconstruct_persistent_obj, (meta,)

    fake = types.ModuleType("torch_utils.persistence")
    fake._reconstruct_persistent_obj = _reconstruct_persistent_obj
    saved = {k: sys.modules.get(k) for k in ("torch_utils", "torch_utils.persistence")}
    sys.modules.update({"torch_utils": types.ModuleType("torch_utils"), "torch_utils.persistence": fake})
    try:
        buf = io.BytesIO()
        Writer(buf, protocol=4).dump(obj)
        return buf.getvalue()
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


@pytest.fixture(scope="module")
def ref(parity):
    return parity("precond_edm.pt")


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
    """The legacy storage bytes are themselves a pickle: they go through PyTorch's weights-only loader."""
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
    """A loopback HTTP server for one blob, with Range support; it can cut the first response short."""

    def __init__(self, blob: bytes, cut_first: bool):
        self.blob, self.cut_first, self.requests = blob, cut_first, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append(self.headers.get("Range"))
                if self.path != "/edm-mini.pkl":
                    self.send_error(404)
                    return
                start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
                body = server.blob[start:]
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(server.blob) - 1}/{len(server.blob)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.cut_first and len(server.requests) == 1:
                    body = body[: len(body) // 2]  # the connection drops half way
                    self.close_connection = True
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/edm-mini.pkl"
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


def test_loaded_snapshot_samples_like_official(snapshot_pkl, parity):
    """What a user does with a released snapshot: load_network, then edm_sampler (Chapter 3), here on the
    small official-layout snapshot; the images match the official sampler run with the official network."""
    from edm_lit.samplers import edm_sampler

    ref = parity("sampler_edm.pt")
    net = load_network(snapshot_pkl)
    with torch.no_grad():
        images = edm_sampler(net, ref["latents"], ref["class_labels"])
    assert images.dtype == torch.float64
    assert ((images - ref["det_out"]).abs().max() / ref["det_out"].abs().max()).item() < 1e-3
