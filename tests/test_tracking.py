import json

import cv2
import numpy as np
import pytest

from pvp.tracking import topology as topo
from pvp.tracking.align import (
    apply_affine,
    crop,
    ffhq_anchors,
    ffhq_half_sides,
    ffhq_quad_params,
    neutral_crop_ratio,
    quad_from_params,
    unit_transform,
)
from pvp.tracking.face_model import FaceModel, learn_face_model
from pvp.tracking.track import Track, TrackError
from pvp.tracking.tracker import NoFaceError, TrackSettings, controls_from_landmarks, track_video
from pvp.video import VideoError
from pvp_contract.geometry import (
    axis_angle_from_rotation,
    rotation_from_axis_angle,
    rotation_from_ypr,
    umeyama,
    ypr_from_rotation,
)

# --- geometry and conventions ------------------------------------------------------------------------

def test_ypr_and_axis_angle_round_trip():
    rng = np.random.default_rng(0)
    for _ in range(50):
        ypr = rng.uniform([-80, -60, -60], [80, 60, 60])
        R = rotation_from_ypr(*ypr)
        assert np.allclose(ypr_from_rotation(R), ypr, atol=1e-9)
        assert np.allclose(rotation_from_axis_angle(axis_angle_from_rotation(R)), R, atol=1e-9)


def test_sign_conventions():
    nose = np.array([0, 0, 1.0])  # FLAME frame: Z out of the face
    assert (rotation_from_ypr(20, 0, 0) @ nose)[0] > 0  # yaw > 0: nose to image right (+X)
    assert (rotation_from_ypr(0, 20, 0) @ nose)[1] > 0  # pitch > 0: nose up (+Y)
    up = np.array([0, 1.0, 0])
    assert (rotation_from_ypr(0, 0, 20) @ up)[0] > 0  # roll > 0: top of the head to image right = clockwise
    assert np.allclose(axis_angle_from_rotation(rotation_from_ypr(30, 0, 0)), [0, np.radians(30), 0])


def test_umeyama_recovers_similarity():
    rng = np.random.default_rng(1)
    src = rng.normal(size=(40, 3))
    R = rotation_from_ypr(10, -20, 5)
    s, R2, t = umeyama(src, 2.5 * src @ R.T + [1, 2, 3])
    assert np.isclose(s, 2.5) and np.allclose(R2, R) and np.allclose(t, [1, 2, 3])


def test_known_rotations_of_the_canonical_face_are_recovered(d3_track):
    """Pose the subject's canonical mesh at known angles, turn it into MediaPipe's normalised landmarks,
    and track those: the angles come back (sign conventions end to end)."""
    model = d3_track.face_model
    truth = np.array([[0, 0, 0], [25, 0, 0], [-30, 10, 0], [0, -15, 8], [12, 6, -10]], dtype=float)
    W = H = 512
    lms = []
    for ypr in truth:
        mesh = 40 * model.mean @ rotation_from_ypr(*ypr).T + [256, -256, 0]  # FLAME-frame pixels
        lms.append(np.stack([mesh[:, 0] / W, -mesh[:, 1] / H, -mesh[:, 2] / W], -1))
    lm = np.stack(lms).astype(np.float64)
    arrays, _ = controls_from_landmarks(lm, np.ones(len(lm), bool), W, H, model, TrackSettings())
    assert np.allclose(arrays["yaw_pitch_roll"], truth, atol=0.5)
    assert np.allclose(arrays["expression"], arrays["expression"][0], atol=1e-3)  # rigid motion only


# --- the real clips (tests/data) ---------------------------------------------------------------------------

@pytest.mark.parametrize("clip", ["lp_d3", "lp_d12"])
def test_real_clips(clip, real_data, d3_track, d12_track):
    track = {"lp_d3": d3_track, "lp_d12": d12_track}[clip]
    measured = json.loads((real_data / f"{clip}.json").read_text())["measured"]
    assert track.valid.mean() >= 0.98
    for j, name in [(0, "yaw"), (1, "pitch")]:
        ours = track.yaw_pitch_roll[track.valid, j]
        refs = [measured[f"{name}_deg"], measured[f"{name}_3d_deg"]]  # PnP and 3D-fit estimates
        ok = [abs(ours.min() - r["min"]) <= 5 and abs(ours.max() - r["max"]) <= 5 for r in refs]
        assert any(ok), f"{clip} {name} range {ours.min():.1f}..{ours.max():.1f} vs {refs}"
    assert track.face_model.jaw_explained + track.face_model.explained[:32].sum() >= 0.95
    assert track.expression.shape[1] <= 50
    coeffs = track.expression[track.valid]
    assert np.allclose(coeffs.std(0), 1.0, atol=0.05)  # unit-variance coefficients


@pytest.mark.parametrize("clip", ["lp_d3", "lp_d12"])
def test_the_expressions_leave_the_jaw_to_its_own_channel(clip, d3_track, d12_track):
    """As in FLAME, no expression channel opens the mouth: the jaw is not predictable from them (it was, to
    R² 0.99, when the PCA took the jaw in), and the face model's neutral mesh has the jaw closed."""
    track = {"lp_d3": d3_track, "lp_d12": d12_track}[clip]
    jaw, coeffs = track.jaw_pose[track.valid, :2], track.expression[track.valid, :20]
    design = np.c_[coeffs, np.ones(len(coeffs))]
    residual = jaw - design @ np.linalg.lstsq(design, jaw, rcond=None)[0]
    assert (1 - residual.var(0) / jaw.var(0)).max() < 0.05
    assert track.face_model.jaw_explained > 0.3  # the jaw holds much of a talking face's non-rigid motion
    model = track.face_model
    assert np.degrees(np.abs(model.jaw(model.mean[None])[0, :2])).max() < 0.5


def test_no_expression_component_moves_the_jaw(d12_track):
    model = d12_track.face_model
    closed = model.jaw(model.mean[None])[0, :2]
    for i in range(8):
        for sd in (-2, 2):
            moved = model.jaw((model.mean + sd * model.scales[i] * model.components[i])[None])[0, :2]
            assert np.degrees(np.abs(moved - closed)).max() < 0.5, (i, sd)


@pytest.mark.parametrize("frames", [5, 20])
def test_a_short_clips_expressions_leave_the_jaw_out_too(frames, d12_track):
    """With fewer frames than components, the jaw's directions are not kept as expressions."""
    mesh = d12_track.landmarks_3d[d12_track.valid][:frames]
    model = learn_face_model(mesh)
    assert len(model.scales) <= frames - 3  # the mean and the jaw's two angles take three
    free = model.fit_head(mesh).posefree
    coeffs, jaw = model.expression(free), model.jaw(free)[:, :2]
    corr = np.corrcoef(np.c_[coeffs, jaw].T)[: coeffs.shape[1], coeffs.shape[1]:]
    assert np.abs(corr).max() < 1e-3


def test_face_models_written_before_the_jaw_basis_keep_their_expressions(d3_track):
    model = d3_track.face_model
    old = {k: v for k, v in model.arrays().items() if k not in ("face_model.jaw_basis", "face_model.jaw_explained")}
    read = FaceModel.from_arrays(old)
    assert not read.jaw_basis.any() and read.jaw_explained == 0
    posefree = model.fit_head(d3_track.landmarks_3d[d3_track.valid][:5]).posefree
    pca_of_the_whole_mesh = (posefree - read.mean).reshape(5, -1) @ read.components.reshape(
        len(read.components), -1).T / read.scales
    assert np.allclose(read.expression(posefree), pca_of_the_whole_mesh)
    again = FaceModel.from_arrays(model.arrays())
    assert np.allclose(again.expression(posefree), model.expression(posefree), atol=1e-4)


def test_jaw_follows_the_mouth(d3_track, real_data):
    import csv

    rows = list(csv.DictReader(open(real_data / "lp_d3_mediapipe_frames.csv")))
    mouth_open = np.array([float(r["mouth_open"]) for r in rows])
    assert np.corrcoef(d3_track.jaw_pose[:, 0], mouth_open)[0, 1] > 0.8
    assert np.median(d3_track.jaw_pose[mouth_open > 0.3, 0]) > np.radians(5)  # open mouth: jaw opened


def _eye_centres(lm2d):
    return lm2d[:, list(topo.RIGHT_EYE)].mean(1), lm2d[:, list(topo.LEFT_EYE)].mean(1)


@pytest.fixture(scope="module")
def ffhq_sized_tracks(real_data):
    """The two clips tracked with FFHQ's per-frame crop size (the tracker's ``crop_scale="ffhq"``)."""
    return [track_video(real_data / f"{clip}.mp4", TrackSettings(crop_scale="ffhq"), progress=False)
            for clip in ("lp_d3", "lp_d12")]


def _eye_offsets(track, frames):
    """Per eye, how far (in crop widths) the track's smoothed crop puts it from FFHQ's per-frame recipe."""
    lm = track.landmarks_2d[track.valid].astype(np.float64)
    smoothed = unit_transform(track.align_quad[track.valid])
    recipe = unit_transform(quad_from_params(*ffhq_quad_params(lm)))
    return [np.abs(apply_affine(smoothed, eye[:, None])[:, 0] - apply_affine(recipe, eye[:, None])[:, 0])[frames]
            for eye in _eye_centres(lm)]


def _sized_by_eyes(track):
    by_eyes, by_mouth = ffhq_half_sides(*ffhq_anchors(track.landmarks_2d[track.valid].astype(np.float64))[1:])
    return by_eyes >= by_mouth


def test_aligned_eyes_stay_near_their_ffhq_positions(ffhq_sized_tracks, d3_track, d12_track):
    for track in ffhq_sized_tracks:
        assert max(offsets.max() for offsets in _eye_offsets(track, slice(None))) <= 0.02  # of the crop's width
    for track in (d3_track, d12_track):  # sized by the head: FFHQ's framing where the mouth does not size it
        sized_by_eyes = _sized_by_eyes(track)
        assert sized_by_eyes.mean() > 0.3
        assert max(offsets.max() for offsets in _eye_offsets(track, sized_by_eyes)) <= 0.02


def _crop_over_head(track):
    """The crop's side over the rigid head's scale, and the jaw's opening (degrees), on the valid frames."""
    quads = track.align_quad[track.valid]
    side = np.linalg.norm(quads[:, 3] - quads[:, 0], axis=1)
    return side / track.scale[track.valid], np.degrees(track.jaw_pose[track.valid, 0])


def test_an_opening_mouth_does_not_zoom_the_crop(ffhq_sized_tracks, d3_track, d12_track):
    for per_frame, by_head in zip(ffhq_sized_tracks, (d3_track, d12_track)):
        ratio, jaw = _crop_over_head(per_frame)  # FFHQ's recipe: the mouth sizes the crop
        assert np.percentile(ratio, 95) / np.percentile(ratio, 5) > 1.1 and np.corrcoef(ratio, jaw)[0, 1] > 0.5
        ratio, jaw = _crop_over_head(by_head)
        assert np.percentile(ratio, 95) / np.percentile(ratio, 5) < 1.03 and abs(np.corrcoef(ratio, jaw)[0, 1]) < 0.2
        assert by_head.settings["crop_scale"] == "head"


def test_the_neutral_crop_ratio_is_taken_where_the_eyes_size_the_crop():
    ratio = np.array([4.0, 4.1, np.nan, 4.6, 4.8])
    assert neutral_crop_ratio(ratio, np.array([True, True, True, False, False])) == pytest.approx(4.05)
    assert neutral_crop_ratio(ratio, np.zeros(5, bool)) == pytest.approx(4.35)  # the mouth sizes every frame


def test_an_unknown_crop_rule_is_refused():
    with pytest.raises(ValueError, match="crop_scale 'mouth': expected one of head, ffhq"):
        TrackSettings(crop_scale="mouth")


def test_smoothing_lowers_jitter(d3_track, d12_track):
    def jitter(x):
        return np.linalg.norm(np.diff(x, 2, axis=0), axis=-1).mean()

    for track, bound in ((d3_track, 0.6), (d12_track, 0.75)):  # lp_d12 moves fast: smoothing is bounded there
        lm = track.landmarks_2d[track.valid].astype(np.float64)
        raw_c, _ = ffhq_quad_params(lm)
        assert jitter(track.align_quad[track.valid].mean(1)) < bound * jitter(raw_c)


def test_crop_puts_the_quad_on_the_output_square():
    rgb = np.zeros((300, 400, 3), np.uint8)
    cv2.circle(rgb, (200, 150), 20, (255, 255, 255), -1)
    quad = quad_from_params(np.array([[200.0, 150.0]]), np.array([[50.0, 0.0]]))[0]
    out, A = crop(rgb, quad, 256)
    assert out.shape == (256, 256, 3)
    assert np.allclose(apply_affine(A, np.array([200.0, 150.0])), [128, 128])
    assert out[128, 128].min() == 255 and out[5, 5].max() == 0


# --- the track file ------------------------------------------------------------------------------------

def test_track_file_round_trip(d3_track, tmp_path):
    path = tmp_path / "t.safetensors"
    d3_track.save(path)
    back = Track.load(path)
    assert back.header() == json.loads(json.dumps(d3_track.header()))
    assert np.allclose(back.expression, d3_track.expression, atol=1e-5)
    assert np.allclose(back.face_model.components, d3_track.face_model.components, atol=1e-6)
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(TrackError, match="junk.safetensors"):
        Track.load(tmp_path / "junk.safetensors")


def test_driving_video_in_the_source_expression_space(d3_track, real_data):
    drive = track_video(real_data / "lp_d12.mp4", TrackSettings(end=40), face_model=d3_track.face_model,
                        progress=False)
    assert drive.expression.shape[1] == d3_track.expression.shape[1]
    assert np.allclose(drive.face_model.components, d3_track.face_model.components)
    assert np.isfinite(drive.expression[drive.valid]).all()


# --- bad input ------------------------------------------------------------------------------------------

def _write_video(path, frames, fps=10):
    h, w = frames[0].shape[:2]
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    for f in frames:
        vw.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    vw.release()


def test_bad_inputs_name_the_file(tmp_path):
    with pytest.raises(VideoError, match="nothere.mp4: no such file"):
        track_video(tmp_path / "nothere.mp4", progress=False)
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoError, match="empty.mp4: the file is empty"):
        track_video(tmp_path / "empty.mp4", progress=False)
    (tmp_path / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(VideoError, match="corrupt.mp4: cannot decode"):
        track_video(tmp_path / "corrupt.mp4", progress=False)
    _write_video(tmp_path / "noface.mp4", [np.full((128, 128, 3), 90, np.uint8)] * 5)
    with pytest.raises(NoFaceError, match="noface.mp4: no face found in any of the 5 frames"):
        track_video(tmp_path / "noface.mp4", progress=False)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(VideoError, match="holds no images"):
        track_video(tmp_path / "nothing", progress=False)


def _frames(path, n):
    cap = cv2.VideoCapture(str(path))
    out = [cv2.cvtColor(cap.read()[1], cv2.COLOR_BGR2RGB) for _ in range(n)]
    cap.release()
    return out


def test_folder_with_faceless_frames_and_a_second_face(real_data, tmp_path):
    frames = _frames(real_data / "lp_d3.mp4", 8)
    other = cv2.resize(cv2.cvtColor(cv2.imread(str(real_data / "img_lp_d9.jpg")), cv2.COLOR_BGR2RGB), (512, 512))
    blank = np.full((512, 512, 3), 200, np.uint8)
    for i, f in enumerate(frames):
        right = other if i >= 5 else blank
        img = np.concatenate([f, right], 1) if i != 3 else np.full((512, 1024, 3), 200, np.uint8)
        cv2.imwrite(str(tmp_path / f"{i:03d}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    track = track_video(tmp_path, progress=False)
    assert track.invalid_frames == [3]
    assert np.isnan(track.yaw_pitch_roll[3]).all()
    events = {e["type"]: e["frames"] for e in track.events}
    assert events["no_face"] == [3] and events["several_faces"] == [5, 6, 7]
    followed_x = track.landmarks_2d[track.valid, :, 0].mean(axis=1)
    assert (followed_x < 512).all()  # the subject on the left was kept
