import copy

import cv2
import numpy as np
import pytest
import torch

from pvp.tracking.align import crop
from pvp.tracking.differentiable import ALIGNED_ROI, DifferentiableTracker, aligned_roi, mediapipe_landmark_model
from pvp.tracking.tflite_graph import TFLiteGraph


def _frames(path, indices):
    cap = cv2.VideoCapture(str(path))
    out, i = {}, 0
    while len(out) < len(indices):
        ok, bgr = cap.read()
        if not ok:
            break
        if i in indices:
            out[i] = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        i += 1
    cap.release()
    return out


def _mediapipe_roi_crops(track, frames):
    """192x192 crops as MediaPipe takes them: the landmarks' box scaled 1.5, upright."""
    crops = []
    for i, rgb in frames.items():
        lm = track.landmarks_2d[i, :468]
        lo, hi = lm.min(0), lm.max(0)
        c, side = (lo + hi) / 2, (hi - lo).max() * 1.5
        s = 192 / side
        A = np.array([[s, 0, 96 - s * c[0]], [0, s, 96 - s * c[1]]])
        crops.append(cv2.warpAffine(rgb, A, (192, 192), flags=cv2.INTER_LINEAR).astype(np.float32) / 255)
    return np.stack(crops)


@pytest.fixture(scope="module")
def landmark_net():
    return TFLiteGraph(mediapipe_landmark_model()).eval()


def test_port_agrees_with_mediapipe_runtime_within_a_pixel(landmark_net, real_data, d3_track, d12_track):
    """The same 192x192 input through MediaPipe's model in the TFLite runtime (LiteRT) and through the
    PyTorch port: landmarks within 1 px, on real frames of both clips."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(mediapipe_landmark_model()))
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]["index"]
    out = [d["index"] for d in interp.get_output_details() if np.prod(d["shape"]) == 1404][0]
    for clip, track in (("lp_d3.mp4", d3_track), ("lp_d12.mp4", d12_track)):
        crops = _mediapipe_roi_crops(track, _frames(real_data / clip, {0, 40, 90, 150}))
        with torch.no_grad():
            ours = landmark_net(torch.from_numpy(crops).permute(0, 3, 1, 2))[0].reshape(len(crops), 468, 3).numpy()
        for k, c in enumerate(crops):
            interp.set_tensor(inp, c[None])
            interp.invoke()
            ref = interp.get_tensor(out).reshape(468, 3)
            assert np.abs(ours[k, :, :2] - ref[:, :2]).max() < 1.0


def test_gradients_reach_the_image(d3_track, real_data):
    tracker = DifferentiableTracker(d3_track.face_model)
    rgb = _frames(real_data / "lp_d3.mp4", {0})[0]
    aligned, _ = crop(rgb, d3_track.align_quad[0], 256)
    img = torch.from_numpy(aligned).permute(2, 0, 1)[None].float() / 127.5 - 1
    img.requires_grad_(True)
    out = tracker(img)
    (out["yaw"].sum() + out["expression"][:, :8].sum() + out["jaw"][:, 0].sum()).backward()
    assert img.grad is not None and img.grad.abs().sum() > 0 and torch.isfinite(img.grad).all()


def test_tracks_aligned_frames_like_the_embedded_tracker(d3_track, real_data):
    tracker = DifferentiableTracker(d3_track.face_model)
    idx = [0, 60, 120, 180, 240, 300]
    frames = _frames(real_data / "lp_d3.mp4", set(idx))
    imgs = torch.stack([torch.from_numpy(crop(frames[i], d3_track.align_quad[i], 256)[0]).permute(2, 0, 1)
                        for i in idx]).float() / 127.5 - 1
    with torch.no_grad():
        out = tracker(imgs)
    # The aligned crop removes the in-plane roll; yaw and pitch survive alignment.
    yaw, pitch = np.degrees(out["yaw"].numpy()), np.degrees(out["pitch"].numpy())
    assert np.abs(yaw - d3_track.yaw_pitch_roll[idx, 0]).max() < 4
    assert np.abs(pitch - d3_track.yaw_pitch_roll[idx, 1]).max() < 4
    corr = np.corrcoef(out["jaw"][:, 0].numpy(), d3_track.jaw_pose[idx, 0])[0, 1]
    assert corr > 0.9


def test_the_head_scale_grows_with_the_face_in_the_crop(d3_track, real_data):
    """pvp eval's size shift reads the rigid fit's scale: a crop 10% tighter shows the head 10% larger."""
    idx = [0, 100, 200]
    frames = _frames(real_data / "lp_d3.mp4", set(idx))

    def cropped(zoom):
        quads = [d3_track.align_quad[i] for i in idx]
        tiles = [crop(frames[i], q.mean(0) + (q - q.mean(0)) / zoom, 256)[0] for i, q in zip(idx, quads)]
        return torch.stack([torch.from_numpy(t).permute(2, 0, 1) for t in tiles]).float() / 127.5 - 1

    tracker = DifferentiableTracker(d3_track.face_model)
    with torch.no_grad():
        ratio = (tracker(cropped(1.1))["scale"] / tracker(cropped(1.0))["scale"]).numpy()
    assert np.all((ratio > 1.06) & (ratio < 1.14)), ratio


def test_the_roi_measured_on_a_clips_crops_reads_its_head_pose_closer(d12_track, real_data):
    """lp_d12's faces sit larger in their crops than the shared clips' FFHQ crops, of which ALIGNED_ROI was
    measured, and its head-sized crops keep open mouths at the head's size. MediaPipe's ROI rule measured on
    the clip's own crops reads the head's yaw and pitch closer to the embedded tracker's."""
    roi = aligned_roi(d12_track)
    assert roi[2] > ALIGNED_ROI[2]
    idx = list(range(0, len(d12_track), 8))
    frames = _frames(real_data / "lp_d12.mp4", set(idx))
    imgs = torch.stack([torch.from_numpy(crop(frames[i], d12_track.align_quad[i], 256)[0]).permute(2, 0, 1)
                        for i in idx]).float() / 127.5 - 1
    errors = {}
    for name, region in (("fixed", ALIGNED_ROI), ("measured", roi)):
        with torch.no_grad():
            out = DifferentiableTracker(d12_track.face_model, roi=region)(imgs)
        errors[name] = [np.median(np.abs(np.degrees(out[k].numpy()) - d12_track.yaw_pitch_roll[idx, c]))
                        for k, c in (("yaw", 0), ("pitch", 1))]
    assert all(m < f for m, f in zip(errors["measured"], errors["fixed"])), errors


def test_port_reproduces_mediapipe_face_mesh_landmarks(landmark_net, real_data):
    """Pipeline level: MediaPipe's face mesh (without the iris refinement, i.e. this very model) tracks a
    face by cropping each frame around the previous frame's landmarks (box x 1.5, square, rotated to level
    the eye corners 33-263). Given that crop, the port returns MediaPipe's own landmarks."""
    import mediapipe as mp

    mesh = mp.solutions.face_mesh.FaceMesh(static_image_mode=False, max_num_faces=1, refine_landmarks=False)
    cap = cv2.VideoCapture(str(real_data / "lp_d12.mp4"))
    frames, landmarks = [], []
    while len(frames) < 120:
        ok, bgr = cap.read()
        if not ok:
            break
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        face = mesh.process(rgb).multi_face_landmarks[0]
        frames.append(rgb)
        landmarks.append(np.array([(p.x * rgb.shape[1], p.y * rgb.shape[0]) for p in face.landmark]))
    errors = []
    for i in range(1, len(frames), 5):
        prev = landmarks[i - 1]
        lo, hi = prev.min(0), prev.max(0)
        centre, side = (lo + hi) / 2, (hi - lo).max() * 1.5
        angle = np.arctan2(prev[263, 1] - prev[33, 1], prev[263, 0] - prev[33, 0])
        k = side / 192
        M = np.array([[np.cos(angle) * k, -np.sin(angle) * k, 0], [np.sin(angle) * k, np.cos(angle) * k, 0]])
        M[:, 2] = centre - M[:, :2] @ [96, 96]  # crop pixel -> image pixel
        crop192 = cv2.warpAffine(frames[i], cv2.invertAffineTransform(M), (192, 192), flags=cv2.INTER_LINEAR)
        with torch.no_grad():
            out = landmark_net(torch.from_numpy(crop192.astype(np.float32) / 255).permute(2, 0, 1)[None])[0]
        back = out.reshape(468, 3)[:, :2].numpy() @ M[:, :2].T + M[:, 2]
        errors.append((np.linalg.norm(back - landmarks[i], axis=1) / k).max())  # in 192-px units
    # Frames where MediaPipe re-ran its face detector used another crop; most frames follow the rule.
    assert np.median(errors) < 1.0


def test_reads_the_expressions_as_the_embedded_tracker_does(d3_track):
    """Given the same landmarks, the same jaw and the same jaw-free expression coefficients."""
    tracker = DifferentiableTracker(d3_track.face_model)
    idx = [0, 100, 200, 300]
    image_frame = torch.as_tensor(d3_track.landmarks_3d[idx, :468] * [1, -1, -1], dtype=torch.float32)
    tracker.landmarks = lambda images: image_frame
    with torch.no_grad():
        out = tracker(torch.zeros(len(idx), 3, 8, 8))
    assert np.allclose(out["jaw"].numpy(), d3_track.jaw_pose[idx], atol=1e-4)
    assert np.allclose(out["expression"].numpy(), d3_track.expression[idx], atol=2e-3)


def test_the_expressions_gradient_does_not_run_through_the_jaw_estimate(d3_track):
    """The jaw's offset is taken out of the expressions at the tracked jaw angle, which three landmarks set (the
    chin and the two ear points, in the head's rigid set too). Through it, their noise and an objective's gradient
    would reach every coefficient; the offset is subtracted as a constant."""
    tracker = DifferentiableTracker(d3_track.face_model)
    landmarks = torch.as_tensor(d3_track.landmarks_3d[[0, 150], :468] * [1, -1, -1], dtype=torch.float32)
    landmarks.requires_grad_(True)
    tracker.landmarks = lambda images: landmarks
    out = tracker(torch.zeros(2, 3, 8, 8))
    (grad,) = torch.autograd.grad(out["expression"][:, :8].sum(), landmarks)
    offset_left_in = copy.deepcopy(tracker)  # the same tracker, the jaw's offset not taken out at all
    offset_left_in.jaw_rows.zero_()
    offset_left_in.landmarks = lambda images: landmarks
    expression = offset_left_in(torch.zeros(2, 3, 8, 8))["expression"]
    (reference,) = torch.autograd.grad(expression[:, :8].sum(), landmarks)
    assert d3_track.face_model.jaw_basis.any()
    assert torch.allclose(grad, reference, atol=1e-5)
