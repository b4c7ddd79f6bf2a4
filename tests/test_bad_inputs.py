"""Every command of the CLI against bad values and bad files: exit code 2, one line naming the key or file, no
traceback, no run folder or cache entry left behind, the input files unchanged, no payload executed."""

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ems_yolo.cfg import ems_home, load_model_yaml
from ems_yolo.cli import run
from shared_data import SAMPLE, SHARED_DATA
from ultralytics_logs import ultralytics_log

ORIGINAL = SHARED_DATA / "checkpoints" / "original-res10-ee-nc2-T5.pt"
VIDEO = SHARED_DATA / "videos" / "esim_test_frames.avi"
RAW = SHARED_DATA / "events" / "evt3_sample.raw"  # a camera's EVT 3.0 recording (its header gives the sensor size)


class Payload:
    """Unpickling this writes `marker` (through exec): what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def _yaml(path: Path, d: dict | str) -> Path:
    path.write_text(d if isinstance(d, str) else yaml.safe_dump(d, sort_keys=False))
    return path


def _dataset(root: Path, files: dict) -> Path:
    """A 2-class frame dataset (the same split for train and val): name -> label text; a None label makes the image
    an empty file, a label "text" makes it a text file."""
    import cv2

    for split in ("images", "labels"):
        (root / split / "train").mkdir(parents=True)
    for name, label in files.items():
        image = root / "images" / "train" / name
        if label is None:
            image.write_bytes(b"")
        elif label == "text":
            image.write_text("not an image")
        else:
            cv2.imwrite(str(image), np.full((64, 64, 3), 127, np.uint8))
            (root / "labels" / "train" / f"{Path(name).stem}.txt").write_text(label)
    return _yaml(root / "data.yaml", {"path": str(root), "train": "images/train", "val": "images/train",
                                      "names": {0: "a", 1: "b"}})


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """The bad files (and a few good ones to combine them with), by name."""
    from ems_yolo.engine.checkpoints import write_checkpoint
    from ems_yolo.nn import EMSDetectionModel

    d = tmp_path_factory.mktemp("bad")
    tiny = load_model_yaml("ems-res10.yaml")
    tiny.update(width_multiple=0.125, time_steps=1)
    f = {"dir": d, "marker": d / "pwned.txt"}
    f["tiny_yaml"] = _yaml(d / "tiny.yaml", tiny)
    model = EMSDetectionModel(tiny, verbose=False)
    f["finished"] = write_checkpoint({"model": model, "optimizer": None, "epoch": -1,
                                      "train_args": {"epochs": 3, "task": "detect"}}, d / "finished.pt")
    from ems_yolo import EMSYOLO

    f["finished_ts"] = Path(EMSYOLO(f["finished"]).export(format="torchscript", imgsz=64))  # an exported model
    f["empty_pt"] = d / "empty.pt"
    f["empty_pt"].write_bytes(b"")
    f["random_pt"] = d / "random.pt"
    f["random_pt"].write_bytes(np.random.default_rng(0).bytes(4096))
    f["truncated_pt"] = d / "truncated.pt"
    f["truncated_pt"].write_bytes(f["finished"].read_bytes()[: f["finished"].stat().st_size // 2])
    f["malicious_pt"] = d / "malicious.pt"
    torch.save({"model": model, "epoch": -1, "extra": Payload(f["marker"])}, f["malicious_pt"])
    f["foreign_pt"] = d / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, f["foreign_pt"])
    f["bad_nc"] = _yaml(d / "bad_nc.yaml", {**tiny, "nc": "abc"})
    f["bad_t"] = _yaml(d / "bad_t.yaml", {**tiny, "time_steps": 0})
    f["unknown_module"] = _yaml(d / "unknown_module.yaml", {**tiny, "head": [[-1, 1, "Foo", [8]], *tiny["head"]]})
    f["malformed_yaml"] = _yaml(d / "malformed.yaml", "nc: [1, 2\nbackbone: {")
    f["empty_yaml"] = _yaml(d / "empty.yaml", "")
    f["channels4"] = _yaml(d / "channels4.yaml", {**tiny, "channels": 4})
    f["no_images"] = _yaml(d / "no_images.yaml", {"path": str(d / "nowhere"), "train": "images/train",
                                                  "val": "images/val", "names": {0: "a"}})
    f["empty_jpg"] = d / "empty.jpg"
    f["empty_jpg"].write_bytes(b"")
    f["text_video"] = d / "notavideo.mp4"
    f["text_video"].write_text("not a video")
    f["corrupt_h5"] = d / "corrupt.h5"
    f["corrupt_h5"].write_bytes(np.random.default_rng(1).bytes(2048))
    f["bad_label_data"] = _dataset(d / "bad_label", {"a.png": "0 0.5 0.5 0.2 0.2\n1 0.5 0.5 0.2\n"})
    f["bad_class_data"] = _dataset(d / "bad_class", {"a.png": "7 0.5 0.5 0.2 0.2\n"})
    f["bad_coords_data"] = _dataset(d / "bad_coords", {"a.png": "0 50 60 20 20\n"})
    f["empty_image_data"] = _dataset(d / "empty_image", {"a.png": "0 0.5 0.5 0.2 0.2\n", "b.jpg": None})
    f["text_image_data"] = _dataset(d / "text_image", {"a.png": "0 0.5 0.5 0.2 0.2\n", "c.jpg": "text"})
    f["truncated_raw"] = d / "truncated.raw"
    f["truncated_raw"].write_bytes(b"% evt 2.0\n% geometry 16x16\n% end\n\x00\x00\x00")
    f["future_raw"] = d / "future.raw"
    f["future_raw"].write_bytes(b"% evt 4.0\n% end\n")
    f["outside_raw"] = d / "outside.raw"
    f["outside_raw"].write_bytes(b"% evt 2.0\n% geometry 16x16\n% end\n"
                                 + np.array([(0x8 << 28) | 1, (1 << 28) | (20 << 11) | 3], "<u4").tobytes())
    f["missing"] = d / "missing.pt"
    f["sample_dat"] = SAMPLE
    f["original"] = ORIGINAL
    f["video"] = VIDEO
    f["gen1_dst"] = d / "gen1-out"
    _issue21_files(d, f, tiny)
    return f


def _frames_dataset(root: Path, images: dict[str, bytes], labels: dict[str, bytes], **keys) -> Path:
    """A frame dataset whose train and val split is `images/train` (name -> file bytes, stem -> label bytes);
    `keys` replace those of its 2-class data YAML."""
    for split in ("images", "labels"):
        (root / split / "train").mkdir(parents=True)
    for name, data in images.items():
        (root / "images" / "train" / name).write_bytes(data)
    for stem, data in labels.items():
        (root / "labels" / "train" / f"{stem}.txt").write_bytes(data)
    d = {"path": str(root), "train": "images/train", "val": "images/train", "names": {0: "a", 1: "b"}, **keys}
    return _yaml(root / "data.yaml", {k: v for k, v in d.items() if v is not None})


def _issue21_files(d: Path, f: dict, tiny: dict) -> None:
    """The bad files of the defects of issue 21 (D10, D11, D14, D18): datasets, exported models, cfg files."""
    import cv2

    def png(h: int, w: int) -> bytes:
        rng = np.random.default_rng(h * w)
        return cv2.imencode(".png", rng.integers(0, 255, (h, w, 3), dtype=np.uint8))[1].tobytes()

    box = b"0 0.5 0.5 0.2 0.2\n"
    ok = {"a.png": png(64, 64)}
    for name, keys in {"d_names_mismatch": {"nc": 3}, "d_names_str": {"names": "abc"},
                       "d_names_gap": {"names": {0: "a", 5: "b"}}, "d_nc_str": {"nc": "abc"},
                       "d_names_empty": {"names": []}, "d_kpt_int": {"kpt_shape": 17},
                       "d_names_badkey": {"names": {0: "a", "x": "b"}}}.items():
        f[name] = _frames_dataset(d / name, ok, {"a": box}, **keys)
    for name, label in {"d_inf_cls": b"inf 0.5 0.5 0.2 0.2\n", "d_nan_cls": b"nan 0.5 0.5 0.2 0.2\n",
                        "d_ninf_coord": b"0 0.5 -inf 0.2 0.2\n", "d_nan_coord": b"1 0.5 0.5 nan 0.2\n",
                        "d_nonutf8_label": b"0 0.5 0.5 0.2 0.2\n\xff\xfe 1\n",
                        "d_latin1_label": "0 0.5 0.5 0.2 0.2 # \u00e9t\u00e9\n".encode("latin-1")}.items():
        f[name] = _frames_dataset(d / name, ok, {"a": label})
    f["d_1x1"] = _frames_dataset(d / "d_1x1", {"a.png": png(1, 1), "b.png": png(1, 1)}, {"a": box, "b": box})
    f["d_9x64"] = _frames_dataset(d / "d_9x64", {"a.png": png(64, 64), "b.png": png(9, 64)}, {"a": box, "b": box})
    f["d_text_webp"] = _frames_dataset(d / "d_text_webp", {**ok, "x.webp": b"just some text"}, {"a": box})
    f["d_text_tif"] = _frames_dataset(d / "d_text_tif", {**ok, "x.tif": b"II*\x00 not really a tiff"}, {"a": box})
    whole = png(64, 64)
    f["d_trunc_png"] = _frames_dataset(d / "d_trunc_png", {**ok, "t.png": whole[: len(whole) // 2]}, {"a": box})
    list_root = d / "d_nonutf8_list"
    f["d_nonutf8_list"] = _frames_dataset(list_root, ok, {"a": box}, train="list.txt", val="list.txt")
    (list_root / "list.txt").write_bytes(b"./images/train/a.png\n./images/train/\xff.png\n")
    f["garbage_onnx"] = d / "garbage.onnx"
    f["garbage_onnx"].write_bytes(np.random.default_rng(2).bytes(1000))
    f["text_onnx"] = d / "text.onnx"
    f["text_onnx"].write_text("this is not a model\n")
    f["empty_onnx"] = d / "empty.onnx"
    f["empty_onnx"].write_bytes(b"")
    f["text_torchscript"] = d / "text.torchscript"
    f["text_torchscript"].write_text("this is not a model either\n")
    f["depth_str"] = _yaml(d / "depth_str.yaml", {**tiny, "depth_multiple": "deep"})
    f["width_huge"] = _yaml(d / "width_huge.yaml", {**tiny, "width_multiple": 1e5})
    f["t_float"] = _yaml(d / "t_float.yaml", {**tiny, "time_steps": 2.5})
    f["cfg_energy"] = _yaml(d / "cfg_energy.yaml", {"energy": "maybe"})
    f["cfg_epochs"] = _yaml(d / "cfg_epochs.yaml", {"epochs": 0, "imgsz": 64})
    f["cfg_list"] = _yaml(d / "cfg_list.yaml", "- epochs\n- 3\n")
    f["cfg_imgsz"] = _yaml(d / "cfg_imgsz.yaml", {"imgsz": 99999})
    f["dst_file"] = d / "dst_is_a_file"
    f["dst_file"].write_text("the user's file\n")


CASES = [
    # info
    ("info modle=ems-res10.yaml", "'modle' is not a valid key for 'info'"),
    ("info model=missing.yaml", "model YAML 'missing.yaml' not found"),
    ("info imgsz=0", "imgsz=0: expected a positive integer"),
    ("info imgsz=-5", "imgsz=-5: expected a positive integer"),
    ("info channels=-3", "channels=-3: expected a positive integer"),
    ("info channels=0", "channels=0: expected a positive integer"),
    ("info time_steps=0", "time_steps=0: expected a positive integer"),
    ("info time_steps=abc", "time_steps='abc': expected a positive integer"),
    ("info nc=0", "nc=0: expected a positive integer"),
    ("info input=rgb", "input='rgb': expected one of frames, events"),
    ("info detailed=maybe", "detailed='maybe': expected True or False"),
    ("info model={bad_nc}", "bad_nc.yaml: nc='abc': expected a positive integer"),
    ("info model={bad_t}", "bad_t.yaml: time_steps=0: expected a positive integer"),
    ("info model={unknown_module}", "unknown module 'Foo'"),
    ("info model={malformed_yaml}", "malformed.yaml"),
    ("info model={empty_yaml}", "empty.yaml"),
    ("info notakeyvalue", "'notakeyvalue' is not a key=value pair"),
    # train
    ("train epohcs=3", "'epohcs' is not a valid key for 'train'. Did you mean 'epochs'?"),
    ("train epochs=0", "epochs=0: expected a positive integer"),
    ("train epochs=abc", "epochs='abc': expected a positive integer"),
    ("train imgsz=0", "imgsz=0: expected a positive integer"),
    ("train imgsz=-5", "imgsz=-5: expected a positive integer"),
    ("train time_steps=0", "time_steps=0: expected a positive integer"),
    ("train data=missing.yaml", "missing.yaml"),
    ("train model={tiny_yaml} data={no_images} epochs=1", "nowhere"),
    ("train model={empty_pt}", "empty.pt: empty file"),
    ("train model={truncated_pt}", "truncated.pt: not a readable PyTorch checkpoint"),
    ("train model={random_pt}", "random.pt: not a readable PyTorch checkpoint"),
    ("train model={malicious_pt}", "malicious.pt: needs builtins.exec to load"),
    ("train model={foreign_pt}", "foreign.pt: holds no model"),
    ("train model={finished} resume=True", "finished.pt: training to 3 epochs is finished"),
    ("train model={channels4} imgsz=64 epochs=1", "channels4.yaml: channels: 4, but the data"),
    ("train energy=True", "'energy' applies to 'val' only"),
    ("train model={missing}", "missing.pt: model weights not found"),
    ("train sync_bn=maybe", "sync_bn='maybe': expected True or False"),
    ("train model={finished} sync_bn=True", "sync_bn"),
    ("train model={tiny_yaml} data={bad_label_data} imgsz=64 epochs=1", "a.txt:2: 4 fields '1 0.5 0.5 0.2'"),
    ("train model={tiny_yaml} data={bad_class_data} imgsz=64 epochs=1",
     "a.txt:1: class 7, expected an integer in 0..1"),
    ("train model={tiny_yaml} data={bad_coords_data} imgsz=64 epochs=1", "a.txt:1: coordinates 50 60 20 20 outside"),
    ("train model={tiny_yaml} data={empty_image_data} imgsz=64 epochs=1", "b.jpg: empty file, expected an image"),
    # val
    ("val model={missing}", "missing.pt: model weights not found"),
    ("val model={empty_pt}", "empty.pt: empty file"),
    ("val model={malicious_pt}", "malicious.pt: needs builtins.exec to load"),
    ("val model={finished} time_steps=0", "time_steps=0: expected a positive integer"),
    ("val model={finished} imgsz=0", "imgsz=0: expected a positive integer"),
    ("val energy=maybe", "energy='maybe': expected True or False"),
    ("val iou=2", "iou"),
    ("val stride_ms=5", "'stride_ms' applies to 'predict' only"),
    ("val model={finished} data={no_images}", "nowhere"),
    ("val model={finished} data={text_image_data} imgsz=64", "c.jpg: not a JPG image"),
    ("val model={finished} data={bad_label_data} imgsz=64", "a.txt:2: 4 fields"),
    # predict
    ("predict model={finished}", "predict needs source="),
    ("predict model={finished} source={missing}", "missing.pt"),
    ("predict model={finished} source={sample_dat} stride_ms=0", "stride_ms=0: expected a positive number"),
    ("predict model={finished} source={sample_dat} stride_ms=-5", "stride_ms=-5: expected a positive number"),
    ("predict model={finished} source={sample_dat} stride_ms=abc", "stride_ms='abc': expected a positive number"),
    ("predict model={finished} source={sample_dat}", "records no event representation"),
    ("predict model={finished} source={corrupt_h5}", "corrupt.h5"),
    ("predict model={random_pt} source={sample_dat}", "random.pt: not a readable PyTorch checkpoint"),
    ("predict model={finished} source={video} events=maybe", "events='maybe': expected True or False"),
    ("predict model={finished} source={empty_jpg}", "empty.jpg"),
    ("predict model={finished} source={text_video}", "notavideo.mp4"),
    # export
    ("export model={finished} format=bogus", "bogus"),
    ("export model={missing}", "missing.pt: model weights not found"),
    ("export model={truncated_pt}", "truncated.pt: not a readable PyTorch checkpoint"),
    ("export model={malicious_pt}", "malicious.pt: needs builtins.exec to load"),
    ("export model={finished} imgsz=0", "imgsz=0: expected a positive integer"),
    # export: any format but those ems-yolo tests is one line (openvino, coreml, tflite, ncnn, saved_model, ...)
    ("export model={finished} format=openvino", "format='openvino': expected one of onnx, torchscript"),
    ("export model={finished} format=coreml", "format='coreml': expected one of onnx, torchscript"),
    ("export model={finished} format=saved_model", "format='saved_model': expected one of onnx, torchscript"),
    # track
    ("track model={finished}", "track needs source="),
    ("track model={finished} source={sample_dat}", "expected a frame source"),
    ("track model={finished} source={video} stride_ms=5", "'stride_ms' applies to 'predict' only"),
    ("track model={finished} source={empty_jpg}", "empty.jpg"),
    ("track model={missing} source={video}", "missing.pt: model weights not found"),
    # benchmark
    ("benchmark model={finished} format=tflite", "format='tflite': expected one of pytorch, onnx, torchscript"),
    ("benchmark model={finished} data=missing.yaml", "missing.yaml"),
    ("benchmark model={finished} imgsz=0", "imgsz=0: expected a positive integer"),
    ("benchmark model={malicious_pt}", "malicious.pt: needs builtins.exec to load"),
    ("benchmark modle=x", "'modle' is not a valid key for 'benchmark'"),
    ("benchmark model={finished_ts}", "finished.torchscript: benchmark needs a PyTorch model"),
    # tune
    ("tune iterations=0", "iterations=0: expected a positive integer"),
    ("tune iterations=abc", "iterations='abc': expected a positive integer"),
    ("tune epohcs=3", "Did you mean 'epochs'?"),
    ("tune data=missing.yaml", "missing.yaml"),
    ("tune model={malicious_pt}", "malicious.pt: needs builtins.exec to load"),
    ("tune model={finished_ts}", "finished.torchscript: tune needs a PyTorch model"),
    # checks, settings
    ("checks verbose=True", "'verbose' is not a valid key for 'checks'"),
    ("settings runs_dirr=x", "Did you mean 'runs_dir'?"),
    ("settings runs_dir=", "runs_dir"),
    # energy
    ("energy max_batches=0", "max_batches=0: expected a positive integer"),
    ("energy preset=fp8", "preset='fp8': expected one of fp32, fp16, int8"),
    ("energy e_ac=-1", "e_ac=-1: expected a positive number"),
    ("energy split=dev", "split='dev': expected one of train, val, test"),
    ("energy imgsz=0", "imgsz=0: expected a positive integer"),
    ("energy model={empty_pt}", "empty.pt: empty file"),
    ("energy model={tiny_yaml} data=missing.yaml", "missing.yaml"),
    ("energy modle=x", "'modle' is not a valid key for 'energy'"),
    # convert
    ("convert", "convert needs source="),
    ("convert source={missing}", "missing.pt"),
    ("convert source={truncated_pt} out={dir}/out.pt", "truncated.pt"),
    ("convert source={finished} out={dir}/out.pt", "finished.pt: 'model' is ems_yolo.nn.model.EMSDetectionModel"),
    ("convert source={random_pt} out={dir}/out.pt", "random.pt: cannot be read as a PyTorch checkpoint"),
    ("convert source={original} out={dir}/out.pt time_steps=0", "time_steps=0: expected a positive integer"),
    ("convert source={original} out={dir}/out.pt model=ems-res34.yaml", "but ems-res34.yaml has"),
    ("convert source={original} out={dir}/out.pt model=missing.yaml", "model YAML 'missing.yaml' not found"),
    # gen1
    ("gen1 preprocess dst={gen1_dst}", "gen1 preprocess needs src="),
    ("gen1 preprocess src={dir}/nowhere dst={gen1_dst}", "nowhere"),
    ("gen1 unpack src=a dst=b", "unknown gen1 action 'unpack'"),
    ("gen1 preprocess src={dir} dst={gen1_dst} bins=0", "bins=0: expected a positive integer"),
    ("gen1 preprocess src={dir} dst={gen1_dst} representation=raw", "representation='raw': expected one of"),
    ("gen1 preprocess src={dir} dst={gen1_dst} window_ms=-1", "window_ms=-1: expected a positive number"),
    # gen4
    ("gen4 preprocess dst={gen1_dst}", "gen4 preprocess needs src="),
    ("gen4 preprocess src={dir}/nowhere dst={gen1_dst}", "gen4 folder"),
    ("gen4 preprocess src={dir} dst={gen1_dst} workers=-1", "workers=-1: expected a non-negative integer"),
    ("gen4 preprocess src={dir} dst={gen1_dst} workers=two", "workers='two': expected a non-negative integer"),
    # events
    ("events", "events needs source="),
    ("events source={missing}", "missing.pt"),
    ("events source={text_video} out={dir}/x_td.dat", "notavideo.mp4"),
    ("events source={video} out={dir}/x_td.dat c_on=0", "c_on=0: expected a positive number"),
    ("events source={video} out={dir}/x_td.dat sigma=-1", "sigma=-1: expected a non-negative number"),
    ("events source={video} out={dir}/x_td.dat max_frames=0", "max_frames=0: expected a positive integer"),
    ("events source={video} out={dir}/x_td.dat width=0", "width=0: expected a positive integer"),
    ("events source={truncated_raw} info=True", "truncated.raw: truncated final word (3 of 4 bytes)"),
    ("events source={future_raw} info=True", "future.raw: header 'evt 4.0' is not supported"),
    ("events source={outside_raw} out={dir}/o_td.dat", "outside.raw: event at x=20, y=3 is outside the 16x16"),
    ("events source={sample_dat} out={dir}/o.txt", "o.txt: cannot write events there"),
    ("events source={sample_dat} out={dir}/o.raw", "sensor size is unknown"),
    ("events source={sample_dat}", "needs out=<file.dat or file.raw> (or info=True)"),
    ("events source={video} info=True", "info=True describes an event file"),
    ("events source={sample_dat} info=maybe", "info='maybe': expected True or False"),
    ("predict model={finished} source={truncated_raw}", "truncated.raw"),
    # issue 21, D10: class names of a dataset YAML, named in the user's file
    ("train model={tiny_yaml} data={d_names_mismatch} imgsz=64 epochs=1",
     "d_names_mismatch/data.yaml: 'nc: 3' but 'names' has 2 classes"),
    ("val model={finished} data={d_names_mismatch} imgsz=64", "d_names_mismatch/data.yaml: 'nc: 3'"),
    ("train model={tiny_yaml} data={d_names_str} imgsz=64 epochs=1", "d_names_str/data.yaml: 'names: 'abc''"),
    ("train model={tiny_yaml} data={d_names_gap} imgsz=64 epochs=1",
     "d_names_gap/data.yaml: 'names' keys [0, 5], expected the class indices 0..1"),
    ("val model={finished} data={d_names_badkey} imgsz=64", "d_names_badkey/data.yaml: 'names' keys [0, 'x']"),
    ("train model={tiny_yaml} data={d_nc_str} imgsz=64 epochs=1", "d_nc_str/data.yaml: nc='abc': expected a"),
    ("energy model={tiny_yaml} data={d_names_empty} imgsz=64", "d_names_empty/data.yaml: 'names: []'"),
    ("val model={finished} data={d_kpt_int} imgsz=64", "d_kpt_int/data.yaml: 'kpt_shape' must be list, not int"),
    # D11, D18: label values, image files, text encodings
    ("train model={tiny_yaml} data={d_inf_cls} imgsz=64 epochs=1", "a.txt:1: non-finite field in 'inf 0.5"),
    ("val model={finished} data={d_nan_cls} imgsz=64", "a.txt:1: non-finite field in 'nan 0.5"),
    ("val model={finished} data={d_ninf_coord} imgsz=64", "a.txt:1: non-finite field in '0 0.5 -inf"),
    ("energy model={tiny_yaml} data={d_nan_coord} imgsz=64", "a.txt:1: non-finite field"),
    ("train model={tiny_yaml} data={d_1x1} imgsz=64 epochs=1", "a.png: image of 1x1 pixels, expected at least 10"),
    ("val model={finished} data={d_9x64} imgsz=64", "b.png: image of 64x9 pixels, expected at least 10"),
    ("train model={tiny_yaml} data={d_nonutf8_label} imgsz=64 epochs=1",
     "a.txt: byte 0xff at offset 18 is not UTF-8"),
    ("val model={finished} data={d_latin1_label} imgsz=64", "a.txt: byte 0xe9 at offset 20 is not UTF-8"),
    ("val model={finished} data={d_nonutf8_list} imgsz=64", "list.txt: byte 0xff at offset 36 is not UTF-8"),
    ("train model={tiny_yaml} data={d_text_webp} imgsz=64 epochs=1",
     "x.webp: cannot be read as an image (cannot identify image file)"),
    ("val model={finished} data={d_text_tif} imgsz=64", "x.tif: cannot be read as an image"),
    ("train model={tiny_yaml} data={d_trunc_png} imgsz=64 epochs=1", "t.png: cannot be read as an image"),
    # D11, D18: windows, devices, batches
    ("predict model={finished} source={sample_dat} stride_ms=1e300", "stride_ms=1e+300: expected a positive number"),
    ("predict model={finished} source={sample_dat} stride_ms=0.0001", "stride_ms=0.0001: expected a positive number "
     "of at least 0.001"),
    ("predict model={finished} source={sample_dat} stride_ms=inf", "stride_ms='inf': expected a positive number"),
    ("predict model={finished} source={sample_dat} stride_ms=nan", "stride_ms='nan': expected a positive number"),
    ("gen1 preprocess src={dir} dst={gen1_dst} window_ms=0.0004", "window_ms=0.0004: expected a positive number"),
    ("energy model={tiny_yaml} imgsz=64 batch=2 max_batches=1 device=99",
     "Invalid CUDA 'device=99' requested"),
    ("energy model={tiny_yaml} imgsz=64 batch=0", "batch=0: expected a positive integer"),
    ("energy model={tiny_yaml} imgsz=64 batch=-1", "batch=-1: expected a positive integer"),
    ("energy model={tiny_yaml} imgsz=64 batch=2.5", "batch=2.5: expected a positive integer"),
    ("val model={finished} batch=-1", "batch=-1: expected a positive integer"),
    ("train model={tiny_yaml} batch=0", "batch=0: expected a positive integer up to 4,096, -1 or a fraction"),
    # D14: exported models and export options
    ("predict model={garbage_onnx} source={video}", "garbage.onnx: not an ONNX model"),
    ("predict model={text_onnx} source={video}", "text.onnx: not an ONNX model"),
    ("val model={empty_onnx} imgsz=64", "empty.onnx: ONNX file without a model graph"),
    ("predict model={text_torchscript} source={video}", "text.torchscript: not a TorchScript archive"),
    ("export model={finished} format=onnx opset=1 imgsz=64", "opset=1: expected an ONNX opset from 11 to 22"),
    ("export model={finished} format=onnx opset=99 imgsz=64", "opset=99: expected an ONNX opset"),
    ("export model={finished} format=onnx opset=abc imgsz=64", "opset='abc': expected an ONNX opset"),
    ("export model={finished} format=tflite imgsz=64", "format='tflite': expected one of onnx, torchscript"),
    ("export model={finished} format=engine imgsz=64", "format='engine': expected one of onnx, torchscript"),
    ("export model={finished} format=coreml imgsz=64", "format='coreml'"),
    # D18: files and keys named
    ("gen1 preprocess src={dir} dst={dst_file}", "dst_is_a_file: is a file, expected a folder"),
    ("gen4 preprocess src={dir} dst={dst_file}", "dst_is_a_file: is a file, expected a folder"),
    ("info model={depth_str}", "depth_str.yaml: depth_multiple='deep': expected a positive number"),
    ("info model={width_huge}", "width_huge.yaml: width_multiple=100000.0: expected a positive number up to 16"),
    ("info model={t_float}", "t_float.yaml: time_steps=2.5: expected a positive integer"),
    ("val model={finished} cfg={cfg_energy}", "cfg_energy.yaml: energy='maybe': expected True or False"),
    ("train model={tiny_yaml} cfg={cfg_epochs}", "cfg_epochs.yaml: epochs=0: expected a positive integer"),
    ("predict model={finished} source={video} cfg={cfg_imgsz}", "cfg_imgsz.yaml: imgsz=99999: expected a positive"),
    ("val model={finished} cfg={cfg_list}", "cfg_list.yaml: expected a mapping"),
    ("train cfg={dir}/no_such_cfg.yaml", "no_such_cfg.yaml"),
    # integer keys and upper bounds
    ("info time_steps=2.5", "time_steps=2.5: expected a positive integer"),
    ("info time_steps=1000000000 imgsz=64", "time_steps=1000000000: expected a positive integer up to 1,024"),
    ("info imgsz=99999", "imgsz=99999: expected a positive integer or [height, width] of positive integers, up to"),
    ("val model={finished} imgsz=[64,99999]", "imgsz=[64, 99999]: expected a positive integer"),
    ("gen1 preprocess src={dir} dst={gen1_dst} bins=100000", "bins=100000: expected a positive integer up to 1,024"),
    ("gen1 preprocess src={dir} dst={gen1_dst} cutoff=10.5", "cutoff=10.5: expected a positive integer"),
    ("gen4 preprocess src={dir} dst={gen1_dst} height=100000", "height=100000: expected a positive integer up to"),
    ("events source={video} out={dir}/x_td.dat width=1e9", "width=1000000000.0: expected a positive integer up to"),
    ("train model={tiny_yaml} batch=100000", "batch=100000: expected a positive integer up to 4,096"),
    ("train model={tiny_yaml} workers=100000", "workers=100000: expected a non-negative integer up to 256"),
]


def _digest(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_harness_covers_every_command():
    from ems_yolo.cli import app

    keyless = {"help", "version"}  # they take no key=value argument: nothing of theirs to get wrong
    commands = {c.name or c.callback.__name__ for c in app.registered_commands} - keyless
    assert commands == {c.split()[0] for c, _ in CASES} == {"info", "train", "val", "predict", "export", "energy",
                                                          "convert", "gen1", "gen4", "events", "track", "benchmark",
                                                          "tune", "checks", "settings"}
    assert len(CASES) >= 60


@pytest.mark.parametrize(("command", "message"), CASES, ids=[c for c, _ in CASES])
def test_bad_input_is_one_line_exit_2(command, message, bad, tmp_path, monkeypatch, capsys):
    if "{original}" in command and not ORIGINAL.exists() or "{sample_dat}" in command and not SAMPLE.exists():
        pytest.skip("shared data not available")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # default run folders (runs/detect/...) would appear here
    inputs = _digest(bad["dir"])
    argv = command.format(**bad).split()
    code = run(argv)
    out, err = capsys.readouterr()
    first = err.strip().splitlines()[0] if err.strip() else ""
    assert code == 2, f"exit {code}\n{out}\n{err}"
    assert first.startswith("ems-yolo: error: ") and message in first, err
    assert "Traceback" not in out + err
    assert list(work.iterdir()) == []  # no run folder left behind
    assert _digest(bad["dir"]) == inputs  # inputs unchanged, nothing written beside them
    assert not bad["marker"].exists()  # no payload ran
    assert not [p for p in ems_home().rglob("*.tmp")]  # no half-written cache entry


def test_debug_switch_shows_the_traceback(bad, monkeypatch):
    monkeypatch.setenv("EMS_YOLO_DEBUG", "1")
    with pytest.raises(ValueError, match="empty file"):
        run(["val", f"model={bad['empty_pt']}"])
    monkeypatch.delenv("EMS_YOLO_DEBUG")
    with pytest.raises(ValueError, match="imgsz=0"):
        run(["info", "imgsz=0", "--debug"])


def test_malicious_checkpoint_loads_only_when_trusted(bad, tmp_path, capsys):
    """Refused by default; with trust=True the user takes the risk and the pickle runs (which shows the payload is
    real and that the refusal is what kept it from running)."""
    from ems_yolo import EMSYOLO

    with pytest.raises(ValueError, match="pass trust=True"):
        EMSYOLO(bad["malicious_pt"])
    assert not bad["marker"].exists()
    try:
        assert run(["val", f"model={bad['malicious_pt']}", "trust=True", "imgsz=64", "batch=4", "plots=False",
                    f"project={tmp_path}"]) == 0, capsys.readouterr().err
        assert bad["marker"].read_text() == "pwned"
    finally:
        bad["marker"].unlink(missing_ok=True)


def test_help_imports_neither_torch_nor_ultralytics():
    import subprocess
    import sys

    code = ("import sys; from ems_yolo.cli import run; rc = run(['--help']); "
            "print(rc, 'torch' in sys.modules, 'ultralytics' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "COLUMNS": "120"})
    assert r.stdout.strip().splitlines()[-1] == "0 False False", r.stdout + r.stderr


# Issue 21: what the harness above cannot show (a command that must work, a warning, the Python API, a full disk).


@pytest.mark.parametrize("key", ["time_steps", "channels", "nc", "epochs", "max_batches", "bins", "height", "width",
                                 "max_frames", "cutoff", "workers", "batch"])
def test_integer_keys_take_integral_floats_and_refuse_fractions(key):
    from ems_yolo.cfg import check_value

    for given in (10.0, "10", "10.0", 10):
        value = check_value(key, given)
        assert value == 10 and type(value) is int, (key, given, value)
    for bad in (10.5, "10.5", float("inf"), float("nan"), True, "ten", [10]):
        with pytest.raises(ValueError, match=f"^{key}=.*: expected a (positive|non-negative) integer"):
            check_value(key, bad)


def test_train_batch_keeps_ultralytics_autobatch_values_other_commands_refuse_them():
    from ems_yolo.cfg import check_value

    assert check_value("batch", -1, "train") == -1 and check_value("batch", 0.7, "train") == 0.7
    assert check_value("batch", 16.0, "train") == 16
    for mode in ("val", "predict", "export", "energy"):
        for bad in (-1, 0.7, 0):
            with pytest.raises(ValueError, match=f"batch={bad}: expected a positive integer up to 4,096$"):
                check_value("batch", bad, mode)


def test_integral_float_keys_work_on_the_command_line(bad, capsys):
    """`info time_steps=2.0 imgsz=64.0`: the values Ultralytics' parser gives as floats are used as integers."""
    codes = []
    log = ultralytics_log(lambda: codes.append(run(["info", f"model={bad['tiny_yaml']}", "time_steps=2.0",
                                                     "imgsz=64.0"])))
    assert codes == [0], capsys.readouterr().err
    summary = [line for line in log.splitlines() if "summary:" in line][-1]
    assert "(T=2, 64x64)" in summary


def test_gen1_preprocess_takes_cutoff_and_bins_from_the_command_line(tmp_path, capsys):
    """`cutoff=10` failed with 'cutoff must be a positive integer, got 10.0' (the parser's float reached the
    representation); the cache now records the integers given."""
    from ems_yolo.events.automotive import EventCache
    from ems_yolo.events.synthetic import make_synthetic_gen1

    src = make_synthetic_gen1(tmp_path / "raw", n_train=1, n_val=1, n_test=1, duration_s=1.0)
    dst = tmp_path / "caches"
    code = run(["gen1", "preprocess", f"src={src}", f"dst={dst}", "splits=val", "representation=histogram",
                "cutoff=10", "bins=2.0"])
    assert code == 0, capsys.readouterr().err
    rep = EventCache(dst / "val.h5").representation
    assert (rep.name, rep.cutoff, rep.bins) == ("histogram", 10, 2)


def test_validating_on_other_classes_warns_with_both_class_lists(bad, tmp_path):
    """An 80-class model on a 2-class dataset: one WARNING line naming both class lists (Ultralytics reported the
    model's names without a word); a model of the dataset's own classes validates without it."""
    from ems_yolo import EMSYOLO
    from ems_yolo.engine.checkpoints import write_checkpoint
    from ems_yolo.nn import EMSDetectionModel

    data = str(bad["bad_class_data"]).replace("bad_class", "good_for_names")
    _frames_dataset(Path(data).parent, {"a.png": (bad["dir"] / "bad_class/images/train/a.png").read_bytes()},
                    {"a": b"1 0.5 0.5 0.2 0.2\n"})
    models = {}
    for nc, names in ((80, {i: f"coco{i}" for i in range(80)}), (2, {0: "a", 1: "b"})):
        model = EMSDetectionModel({**load_model_yaml(bad["tiny_yaml"]), "nc": nc}, verbose=False)
        model.names = names
        models[nc] = write_checkpoint({"model": model, "optimizer": None, "epoch": -1,
                                       "train_args": {"task": "detect"}}, tmp_path / f"nc{nc}.pt")
    val = dict(data=data, imgsz=64, batch=1, plots=False, project=str(tmp_path / "runs"))
    log = ultralytics_log(lambda: EMSYOLO(models[80]).val(**val))
    warnings = [line for line in log.splitlines() if "classes" in line and "dataset's" in line]
    assert len(warnings) == 1, log
    assert "80 ['coco0', 'coco1'," in warnings[0] and "2 ['a', 'b']" in warnings[0] and "..." in warnings[0]
    log = ultralytics_log(lambda: EMSYOLO(models[2]).val(**val))
    assert "dataset's" not in log


def test_python_api_refuses_what_the_cli_refuses(bad, tmp_path):
    from ems_yolo import EMSYOLO

    weights = tmp_path / "w.pt"
    weights.write_bytes(bad["finished"].read_bytes())
    model = EMSYOLO(weights)
    for kwargs, message in (({"format": "onnx", "imgsz": 0}, "imgsz=0: expected a positive integer"),
                            ({"format": "onnx", "imgsz": 64, "opset": 1}, "opset=1: expected an ONNX opset"),
                            ({"format": "tflite", "imgsz": 64}, "format='tflite': expected one of onnx")):
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            model.export(**kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pt"]  # nothing exported
    for value in ("yes", 1, "True"):
        with pytest.raises(ValueError, match="energy=.*: expected True or False"):
            model.val(energy=value, data=str(bad["bad_class_data"]), imgsz=64, project=str(tmp_path / "runs"))
    with pytest.raises(ValueError, match="cfg_energy.yaml: energy='maybe': expected True or False"):
        model.val(cfg=str(bad["cfg_energy"]), imgsz=64, project=str(tmp_path / "runs"))
    with pytest.raises(ValueError, match="cfg_epochs.yaml: epochs=0: expected a positive integer"):
        EMSYOLO(bad["tiny_yaml"]).train(cfg=str(bad["cfg_epochs"]), project=str(tmp_path / "runs"))
    for value in (0, -1, 2.5):
        with pytest.raises(ValueError, match=f"batch={value}: expected a positive integer"):
            EMSYOLO(bad["tiny_yaml"]).energy(batch=value, imgsz=64, project=str(tmp_path / "runs"))
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command", ["events source={raw} out={out}/big_td.dat",
                                     "energy model={tiny_yaml} data={bad_label_data} imgsz=64 project={out}"])
def test_a_failed_write_names_where_it_was_writing(command, bad, tmp_path):
    """A write the system refuses without a file name ([Errno 28] No space left on device on a full disk; here
    [Errno 27] File too large under a file-size limit) names where the command was writing."""
    import subprocess
    import sys

    if not RAW.exists():
        pytest.skip("shared data not available")
    out = tmp_path / "out"
    out.mkdir()
    good = _good_copy(bad, tmp_path)
    argv = [a.replace(str(bad["bad_label_data"]), str(good)) for a in command.format(**bad, out=out, raw=RAW).split()]
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096)); from ems_yolo.cli import run; "
            f"sys.exit(run({argv!r}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    key = "out" if command.startswith("events") else "project"
    expected = f"ems-yolo: error: [Errno 27] File too large (writing to {key}={out}"
    assert lines[0].startswith(expected) and "Traceback" not in r.stderr, r.stderr


def _good_copy(bad, tmp_path) -> Path:
    """A valid 2-class dataset (the bad-label one with its label fixed)."""
    image = (bad["dir"] / "bad_label/images/train/a.png").read_bytes()
    return _frames_dataset(tmp_path / "good", {"a.png": image}, {"a": b"0 0.5 0.5 0.2 0.2\n"})


def test_a_system_error_with_a_file_is_named_by_that_file(tmp_path, capsys):
    """`out=` under a file: the system's error names the path already, and it is shown once."""
    if not RAW.exists():
        pytest.skip("shared data not available")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = run(["events", f"source={RAW}", f"out={blocker}/sub/x_td.dat"])
    err = capsys.readouterr().err
    assert code == 2 and err.count(str(blocker)) == 1 and blocker.read_text() == "x", err
