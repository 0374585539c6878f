"""Blender shell: preferences, scene properties, operators, the panel, handlers and the preview timer.
Thin over session.py, preview.py, rig.py, timeline.py and track_import.py (read, check, create)."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import bpy
import numpy as np
from bpy.props import BoolProperty, EnumProperty, FloatProperty, IntProperty, PointerProperty, StringProperty
from bpy_extras.io_utils import ImportHelper

from pvp_contract.client import ServerError, ServerUnavailable
from pvp_contract.driving import DrivingError

from . import bl_movie, bl_plane, bl_rig
from .cluster_job import ClusterJob, ClusterRenderError
from .preview import DOWN
from .rig import RigError, load_rig, rig_for_schema
from .session import Session
from .timeline import TimelineJob, frame_path, frame_range, frames_ahead, runs_of_equal_edits
from .track_import import key_table

RIGS_DIR = Path(__file__).parent / "rigs"
ADDON_ID = __package__


class Runtime:
    """What lives between Blender events: the session, the rig reader, the handler's bookkeeping."""

    def __init__(self):
        self.session: Session | None = None
        self.reader: bl_rig.RigReader | None = None
        self.suspended = False  # set while a job steps through frames itself
        self.rendering = False  # set while Blender renders (render_init .. render_complete / render_cancel)
        # held by whoever uses the session's socket: a render job runs its handlers on a thread of its own
        # while the main thread's timer keeps pumping (a ZeroMQ socket is not thread-safe)
        self.lock = threading.RLock()
        self.dirty_since: float | None = None
        self.last_sent = 0.0
        self.shown_status = ""  # the status the panel last drew
        self.cache_values: list | None = None  # the range's (controls, edits) not cached yet
        self.cache_total = 0  # frames in the range being cached
        self.cache_state = ""  # what the panel says about it

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
        self.session, self.reader = None, None


runtime = Runtime()


def prefs(context=None):
    context = context or bpy.context
    return context.preferences.addons[ADDON_ID].preferences


def new_session(context) -> Session:
    p = prefs(context)
    runtime.close()
    runtime.session = Session(p.endpoint.strip(), p.timeout_s, p.cache_mb, p.preview_size,
                              bpy.path.abspath(p.curve_server_key), bpy.path.abspath(p.curve_client_secret))
    ensure_timer()
    return runtime.session


def rig_reader(scene) -> bl_rig.RigReader | None:
    s, props = runtime.session, scene.pvp
    if s is None or s.info is None or props.rig is None:
        return None
    r = runtime.reader
    if r is None or r.rig != props.rig or r.mesh != props.mesh:
        spec = load_rig(RIGS_DIR / props.rig.get("pvp_rig_file", ""))
        avatar = s.info["avatar"]
        runtime.reader = r = bl_rig.RigReader(spec, props.rig, props.mesh, avatar["control_schema"], avatar["edits"])
    return r


def show(scene, frame) -> None:
    if scene.pvp.image is None:
        scene.pvp.image = bl_plane.ensure_image(frame.width, frame.height)
    bl_plane.show_frame(scene.pvp.image, frame)
    redraw(("VIEW_3D", "IMAGE_EDITOR"))


def request_current(scene, prefetch: bool = False) -> None:
    """Ask for the frame of the rig's current values (shown at once when cached), and prefetch ahead."""
    reader = rig_reader(scene)
    if reader is None or runtime.session is None:
        return
    controls, edits = reader.now()
    frame = runtime.session.preview.want(controls, edits)
    if frame is not None:
        show(scene, frame)
    if prefetch:
        ahead = frames_ahead(scene.frame_current, scene.frame_start, scene.frame_end, scene.frame_step,
                             prefs().prefetch_frames)
        runtime.session.preview.prefetch(reader.at(ahead, edits))
    runtime.last_sent = time.monotonic()


# --- handlers and timer ------------------------------------------------------------------------------------

def on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@bpy.app.handlers.persistent
def on_frame_change(scene, depsgraph=None):
    """The live preview. A render's frame changes are left to on_render_pre (on a render job's thread, too)."""
    if runtime.suspended or runtime.rendering or runtime.session is None or not on_main_thread():
        return
    if not runtime.lock.acquire(blocking=False):  # a render is fetching its frame: ask once it is done
        runtime.dirty_since = runtime.dirty_since or time.monotonic()
        return
    t0 = time.perf_counter()
    try:
        screen = bpy.context.screen
        request_current(scene, prefetch=bool(screen and screen.is_animation_playing))
    except Exception as e:  # a handler must never raise into Blender
        runtime.session.preview.message = f"preview error: {type(e).__name__}: {e}"
    finally:
        runtime.lock.release()
    times = runtime.session.handler_ms
    times.append((time.perf_counter() - t0) * 1000)
    del times[:-500]


@bpy.app.handlers.persistent
def on_depsgraph_update(scene, depsgraph):
    if runtime.suspended or runtime.session is None or scene.pvp.rig is None:
        return
    watched = {scene.pvp.rig.name, scene.pvp.mesh.name if scene.pvp.mesh else None}
    for update in depsgraph.updates:
        idb = update.id
        if getattr(idb, "name", None) in watched or isinstance(idb, (bpy.types.Key, bpy.types.Armature)):
            runtime.dirty_since = runtime.dirty_since or time.monotonic()
            return


@bpy.app.handlers.persistent
def on_render_pre(scene, *_):
    """Before Blender renders a frame (F12, Render Animation from the UI as a job on its own thread,
    ``blender -b FILE -a`` or ``-f N``, Render Scene with PVP): the server's frame for it goes on the plane,
    waiting for the server up to the timeout."""
    s = runtime.session
    if s is None or scene.pvp.rig is None:
        return
    try:
        with runtime.lock:
            if not fetch_frame_now(scene):
                print(f"PVP: frame {scene.frame_current}: {s.status}")
    except Exception as e:  # a handler must never raise into Blender's render
        s.preview.message = f"render: {type(e).__name__}: {e}"


@bpy.app.handlers.persistent
def on_render_init(*_):
    runtime.rendering = True


@bpy.app.handlers.persistent
def on_render_end(*_):
    """After a render (or its cancel) the viewport's plane shows the current frame again."""
    runtime.rendering = False
    runtime.dirty_since = runtime.dirty_since or time.monotonic()


@bpy.app.handlers.persistent
def on_load(*_):
    """A reopened file with a PVP rig connects to the server (preferences) and shows the current frame at
    once; in background mode (``blender -b FILE -a``) this is what lets a render farm render it."""
    runtime.reader = None
    scene = bpy.context.scene
    if scene is None or scene.pvp.rig is None:
        return
    try:
        s = runtime.session if runtime.session is not None else new_session(bpy.context)
    except (FileNotFoundError, ValueError) as e:
        print(f"PVP: cannot connect: {e}")
        return
    if not bpy.app.background:  # the timer shows the current frame once the server has answered
        runtime.dirty_since = time.monotonic()
    elif wait_for_greeting(s, scene):
        request_current(scene)


def fetch_frame_now(scene) -> bool:
    """Show the server's frame for the scene's current frame before anything else happens (blocking, up
    to the timeout): what a render needs. False when the server did not deliver it."""
    s = runtime.session
    if not s.greeted:
        wait_for_greeting(s, scene)
    reader = rig_reader(scene)
    if reader is None:
        return False
    # a render evaluates its own depsgraph: the rig's pose in the file may not be this frame's yet, so the
    # values come from the rig's animation at this frame
    (controls, edits), = reader.at([scene.frame_current])
    frame = s.preview.want(controls, edits)
    if frame is not None:
        show(scene, frame)
        return True
    return wait_for_frame(s, scene)


def tick():
    """Timer: read replies and show the wanted frame; send slider/bone edits at most 30 times a second."""
    s = runtime.session
    if s is None:
        return None
    if not runtime.lock.acquire(blocking=False):  # a render job's thread is fetching its frame
        return 0.05
    try:
        scene = bpy.context.scene
        frame = s.pump()
        if frame is not None and scene is not None:
            show(scene, frame)
        if runtime.dirty_since is not None and scene is not None and s.info is not None \
                and time.monotonic() - runtime.last_sent > 1 / 30:
            runtime.dirty_since = None
            request_current(scene)
        if runtime.cache_values is not None:
            fill_cache(s)
        if s.status + runtime.cache_state != runtime.shown_status:  # redraw the panel only when it changes
            runtime.shown_status = s.status + runtime.cache_state
            redraw()
    except Exception as e:  # keep the timer alive whatever happens
        s.preview.message = f"preview error: {type(e).__name__}: {e}"
    finally:
        runtime.lock.release()
    return 0.01 if (s.preview.in_flight or runtime.dirty_since) else 0.05


def fill_cache(s: Session) -> None:
    """Ask for the uncached frames of the range being cached, as the preview's in-flight limit allows; the
    list shrinks to what is still missing, so each timer tick looks at less."""
    runtime.cache_values = s.preview.uncached(runtime.cache_values)
    s.preview.prefetch(runtime.cache_values)
    left = len(runtime.cache_values)
    runtime.cache_state = f"cached {runtime.cache_total - left}/{runtime.cache_total} frames of the range"
    if not left or s.preview.state == DOWN:
        runtime.cache_values = None
        if left:
            runtime.cache_state += " (stopped: server down)"


def redraw(area_types=("VIEW_3D",)) -> None:
    """Redraw the areas of these types (the panel lives in the 3D view); only the main thread may."""
    screen = bpy.context.screen if on_main_thread() else None
    if screen is not None:
        for area in screen.areas:
            if area.type in area_types:
                area.tag_redraw()


def ensure_timer() -> None:
    if not bpy.app.timers.is_registered(tick):
        bpy.app.timers.register(tick, first_interval=0.01, persistent=True)


def connected_session(op) -> Session | None:
    """The session with the avatar's info, or None after telling the user to connect."""
    s = runtime.session
    if s is None:
        op.report({"ERROR"}, "not connected to a pvp server (PVP panel → Connect)")
    elif s.info is None:
        op.report({"ERROR"}, f"no avatar yet: {s.status}")
    else:
        return s
    return None


def scene_rig(op, scene) -> bl_rig.RigReader | None:
    """The reader of the scene's PVP rig, or None after telling the user what is missing."""
    reader = rig_reader(scene)
    if reader is None:
        op.report({"ERROR"}, "connect and add a PVP rig first")
    return reader


def wait_until(predicate, timeout_s: float, scene) -> bool:
    """Pump replies until predicate() holds, showing frames on ``scene``'s plane (blocking; for renders,
    background mode and explicit sync)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        frame = runtime.session.pump(0.02)
        if frame is not None:
            show(scene, frame)
    return True


def wait_for_greeting(s: Session, scene) -> bool:
    """Block until the server has sent the avatar's info and face mesh, or is down; True with the info."""
    return wait_until(lambda: s.greeted, 2 * s.client.timeout_s + 1, scene) and s.info is not None


def wait_for_frame(s: Session, scene) -> bool:
    """Block until the wanted frame is shown; False when the server is down or did not answer in time."""
    return wait_until(lambda: s.preview.settled, s.client.timeout_s + 1, scene) and s.preview.state != DOWN


# --- preferences and properties ----------------------------------------------------------------------------

class PVPPreferences(bpy.types.AddonPreferences):
    bl_idname = ADDON_ID

    endpoint: StringProperty(name="Server", default="tcp://127.0.0.1:5555",
                             description="the pvp serve endpoint, e.g. tcp://127.0.0.1:5555")
    curve_server_key: StringProperty(name="Server public key", subtype="FILE_PATH",
                                     description="the server's .key file (CURVE, for remote servers)")
    curve_client_secret: StringProperty(name="Client secret key", subtype="FILE_PATH",
                                        description="this machine's .key_secret file (pvp keys)")
    timeout_s: FloatProperty(name="Timeout (s)", default=5.0, min=0.2, max=120.0)
    cache_mb: IntProperty(name="Frame cache (MB)", default=256, min=0, max=16384)
    preview_size: IntProperty(name="Preview size", default=0, min=0, max=2048,
                              description="width of preview frames (0: the avatar's resolution)")
    prefetch_frames: IntProperty(name="Prefetch", default=12, min=0, max=256,
                                 description="frames asked for ahead of playback")
    cluster: StringProperty(name="Cluster", default="",
                            description="Render Timeline (fast) on Ray: local, auto or ray://HOST:PORT, through "
                                        "the pvp command below (empty: the server renders it)")
    pvp_command: StringProperty(name="pvp command", default="pvp", subtype="FILE_PATH",
                                description="the pvp executable installed beside Blender with "
                                            "pip install 'pvp[cluster]' (cluster renders only)")

    def draw(self, context):
        col = self.layout.column()
        for name in ("endpoint", "curve_server_key", "curve_client_secret", "timeout_s", "cache_mb", "preview_size",
                     "prefetch_frames", "cluster", "pvp_command"):
            col.prop(self, name)


class PVPSceneProps(bpy.types.PropertyGroup):
    rig: PointerProperty(type=bpy.types.Object, name="Rig")
    mesh: PointerProperty(type=bpy.types.Object, name="Control mesh")
    plane: PointerProperty(type=bpy.types.Object, name="Image plane")
    image: PointerProperty(type=bpy.types.Image, name="Image")
    output_dir: StringProperty(name="Output", subtype="DIR_PATH", default="//pvp_frames/")
    output_size: IntProperty(name="Output size", default=0, min=0, max=2048,
                             description="width of the fast timeline render's frames (0: the avatar's resolution); "
                                         "the preview size in the preferences is separate")
    movie_path: StringProperty(name="Movie", subtype="FILE_PATH", default="",
                               description="also encode the fast-path frames into this H.264 .mp4 (empty: frames only)")
    avatar_dir: StringProperty(name="Avatar folder", subtype="DIR_PATH", default="",
                               description="the served avatar's folder, as the cluster's workers see it (cluster "
                                           "renders only; pvp checks it is the avatar the server shows)")


# --- operators ---------------------------------------------------------------------------------------------

class PVP_OT_connect(bpy.types.Operator):
    bl_idname = "pvp.connect"
    bl_label = "Connect"
    bl_description = "Connect to the pvp server (Preferences: endpoint, keys, timeout)"

    def execute(self, context):
        try:
            s = new_session(context)
        except (FileNotFoundError, ValueError) as e:
            self.report({"ERROR"}, str(e))
            return {"CANCELLED"}
        if bpy.app.background and not wait_for_greeting(s, context.scene):
            self.report({"ERROR"}, s.status)
            return {"CANCELLED"}
        return {"FINISHED"}


class PVP_OT_sync(bpy.types.Operator):
    bl_idname = "pvp.sync"
    bl_label = "Update Now"
    bl_description = "Show the frame of the current values, waiting for the server (up to the timeout)"

    def execute(self, context):
        s = connected_session(self)
        if s is None:
            return {"CANCELLED"}
        request_current(context.scene)
        if not wait_for_frame(s, context.scene):
            self.report({"WARNING"}, s.status)
            return {"CANCELLED"}
        return {"FINISHED"}


class PVP_OT_add_rig(bpy.types.Operator):
    bl_idname = "pvp.add_rig"
    bl_label = "Add PVP Rig"
    bl_description = "Build the rig matching the connected avatar's controls, its control mesh and the image plane"
    bl_options = {"REGISTER", "UNDO"}

    def execute(self, context):
        s = connected_session(self)
        if s is None:
            return {"CANCELLED"}
        existing = context.scene.pvp.rig
        if existing is not None and existing.name in context.scene.objects:
            self.report({"ERROR"}, f"this scene has a PVP rig already ({existing.name}); delete it first, or use "
                                   "another scene")
            return {"CANCELLED"}
        avatar = s.info["avatar"]
        schema = avatar["control_schema"]
        try:  # nothing here waits for the server: the info and face mesh came with the connection
            spec = rig_for_schema(RIGS_DIR, schema)
            names = [c["name"] for c in spec.expression_channels(schema)]
            arrays = (bl_rig.face_mesh_arrays(s.face_mesh) if s.face_mesh is not None
                      else bl_rig.proxy_mesh_arrays(names))
        except RigError as e:
            self.report({"ERROR"}, str(e))
            return {"CANCELLED"}
        rig = bl_rig.build_armature(context, spec, schema)
        rig["pvp_rig_file"] = Path(spec.path).name
        rig["pvp_avatar_id"] = avatar["id"]
        mesh = bl_rig.build_mesh(context, spec, rig, schema, arrays)
        bl_rig.add_edit_properties(rig, spec, avatar["edits"])
        props = context.scene.pvp
        props.rig, props.mesh = rig, mesh
        if props.plane is None:
            size = s.preview.size or avatar["resolution"]
            props.image = bl_plane.ensure_image(size, size)
            props.plane = bl_plane.add_plane(context, props.image)
        view = context.scene.view_settings  # so the plane's pixels render as the server sent them
        view.view_transform, view.look, view.exposure, view.gamma = "Standard", "None", 0.0, 1.0
        context.scene.render.use_lock_interface = True  # a render job's handlers change the plane's image
        runtime.reader = None
        request_current(context.scene)
        if s.preview.state == DOWN:
            self.report({"WARNING"}, f"server not reachable ({s.status}); the rig has the avatar's ranges from "
                                     "when it was connected, the plane fills in when the server answers")
        return {"FINISHED"}


class PVP_OT_cache_range(bpy.types.Operator):
    bl_idname = "pvp.cache_range"
    bl_label = "Cache Range"
    bl_description = ("Render every frame of the scene range into the preview cache, so playback and scrubbing "
                      "show them at once (Preferences: frame cache size)")

    def execute(self, context):
        scene = context.scene
        reader = scene_rig(self, scene)
        if reader is None:
            return {"CANCELLED"}
        s = runtime.session
        runtime.cache_values = reader.at(frame_range(scene.frame_start, scene.frame_end, scene.frame_step))
        runtime.cache_total = len(runtime.cache_values)
        ensure_timer()
        if bpy.app.background:  # no timer runs: fill it now
            while runtime.cache_values is not None:
                fill_cache(s)
                s.pump(0.05)
        self.report({"INFO"}, runtime.cache_state or "caching the range")
        return {"FINISHED"}


class PVP_OT_reset(bpy.types.Operator):
    bl_idname = "pvp.reset"
    bl_label = "Reset"
    bl_description = "Put the rig's bones (pose) or shape keys (expression) back to the avatar's defaults"
    bl_options = {"REGISTER", "UNDO"}

    what: EnumProperty(items=[("POSE", "Pose", "head, neck and jaw bones"),
                              ("EXPRESSION", "Expression", "every expression shape key")], default="POSE")

    def execute(self, context):
        reader = scene_rig(self, context.scene)
        if reader is None:
            return {"CANCELLED"}
        if self.what == "POSE":
            for pb in context.scene.pvp.rig.pose.bones:
                pb.rotation_euler = (0.0, 0.0, 0.0)
        else:
            blocks = reader.key_blocks()
            for c in reader.spec.expression_channels(reader.schema):
                kb = blocks.get(reader.spec.shape_key(c["name"]))
                if kb is not None:
                    kb.value = c["default"]
        request_current(context.scene)
        return {"FINISHED"}


class PVP_OT_import_track(bpy.types.Operator, ImportHelper):
    bl_idname = "pvp.import_track"
    bl_label = "Import FLAME Track"
    bl_description = ("Keyframe the rig from a driving performance (pvp track, DECA/EMOCA codes, NHA npz, "
                      "metrical-tracker frames or CSV) as a take of its own, source timing kept")
    bl_options = {"REGISTER", "UNDO"}

    filter_glob: StringProperty(default="*.safetensors;*.npz;*.pt;*.pth;*.pkl;*.csv", options={"HIDDEN"})
    start_frame: IntProperty(name="Start frame", default=1, description="the scene frame of the take's first frame")
    resample: BoolProperty(name="Resample to scene fps", default=True,
                           description="place the take's frames by its frame rate (when known) on the scene's")
    source_fps: FloatProperty(name="Track fps", default=0.0, min=0.0,
                              description="the track's frame rate when the file does not say (0: one scene frame "
                                          "per track frame)")
    gaps: EnumProperty(name="Gaps", default="HOLD", items=[
        ("HOLD", "Hold", "frames without a face hold the last value"),
        ("INTERPOLATE", "Interpolate", "frames without a face interpolate between their neighbours")])
    mode: EnumProperty(name="Into", default="STRIP", items=[
        ("STRIP", "New NLA strip", "the take becomes its own action on an NLA track (importing the same file "
                                   "again replaces it); other keys are never touched"),
        ("MERGE", "Active action", "write into the active action, replacing its keys of these channels inside "
                                   "the take's range only")])
    set_frame_range: BoolProperty(name="Scene range follows the take", default=False)
    smoothing: FloatProperty(name="Smoothing (frames)", default=0.0, min=0.0, max=20.0,
                             description="Gaussian smoothing of the imported channels over time (0: the raw take)")
    decimate: BoolProperty(name="Decimate keys", default=False,
                           description="drop keys that the neighbouring keys reproduce within 0.05 degrees "
                                       "(0.005 sd for expressions)")
    renormalize: EnumProperty(name="Normalization", default="RENORMALIZE", items=[
        ("RENORMALIZE", "Renormalize", "map jaw and expression from the track's mean/std to the avatar's "
                                       "(paper, appendix B): for another person's performance"),
        ("NONE", "None", "use the values as they are: for the avatar's own track")])
    use_head: BoolProperty(name="Head", default=True)
    use_jaw: BoolProperty(name="Jaw", default=True)
    use_expression: BoolProperty(name="Expression", default=True)

    def execute(self, context):
        s, props, scene = runtime.session, context.scene.pvp, context.scene
        reader = scene_rig(self, scene)
        if reader is None:
            return {"CANCELLED"}
        groups = [g for g, on in (("head", self.use_head), ("jaw", self.use_jaw), ("expression", self.use_expression))
                  if on]
        avatar = s.info["avatar"]
        scene_fps = scene.render.fps / scene.render.fps_base
        try:
            keys = key_table(self.filepath, reader.schema, groups, self.renormalize == "RENORMALIZE",
                             avatar["expression_stats"], self.start_frame, scene_fps, self.resample, self.source_fps,
                             self.smoothing, (avatar.get("expression_maps") or {}).get("flame"))
        except (DrivingError, ValueError) as e:
            message = str(e)
            self.report({"ERROR"}, message if Path(self.filepath).name in message else f"{self.filepath}: {message}")
            return {"CANCELLED"}
        write_controls(reader, props, f"PVP {Path(self.filepath).stem}", keys, self.gaps, self.mode, self.decimate)
        if self.set_frame_range:
            scene.frame_start, scene.frame_end = keys.frame_range
        timing = (f"{keys.source_fps:g} fps onto the scene's {scene_fps:g}" if keys.source_fps and self.resample
                  else "one scene frame per track frame")
        for note in keys.notes:
            self.report({"WARNING"} if "FLAME" in note else {"INFO"}, note)
        self.report({"INFO"}, f"{len(keys.frames)} keys × {len(keys.names)} channels from {Path(self.filepath).name}, "
                              f"frames {keys.frame_range[0]}–{keys.frame_range[1]} ({timing})")
        return {"FINISHED"}


def write_controls(reader: bl_rig.RigReader, props, take: str, keys, gaps: str, mode: str,
                   decimated: bool = False) -> None:
    """Key the rig's bones and the control mesh's shape keys from a KeyTable."""
    spec = reader.spec
    bones, shapes = [], []
    for j, name in enumerate(keys.names):
        frames, values, hold = keys.channel_keys(j, decimated)
        if name in spec.channels:
            targets = [spec.bone_target(name, v) for v in values]
            bone, axis = targets[0][:2]
            bones.append((f'pose.bones["{bone}"].rotation_euler', axis, bone, frames, np.array([t[2] for t in targets]),
                          hold))
        elif props.mesh is not None and props.mesh.data.shape_keys is not None:
            if spec.shape_key(name) in props.mesh.data.shape_keys.key_blocks:
                shapes.append((f'key_blocks["{spec.shape_key(name)}"].value', -1, "", frames, values, hold))
    if bones:
        bl_rig.write_take(props.rig, take, bones, gaps, mode)
    if shapes:
        bl_rig.write_take(props.mesh.data.shape_keys, take, shapes, gaps, mode)


def timeline_controls(scene, reader) -> list[tuple[int, list[float], dict]]:
    """Every frame's values, evaluated by Blender itself (NLA and drivers included)."""
    current, out = scene.frame_current, []
    runtime.suspended = True
    try:
        for f in frame_range(scene.frame_start, scene.frame_end, scene.frame_step):
            scene.frame_set(f)
            controls, edits = reader.now()
            out.append((f, controls, edits))
    finally:
        scene.frame_set(current)
        runtime.suspended = False
    return out


class FrameStepper:
    """Modal operator body shared by both timeline renders: a timer steps the job, Esc cancels, progress
    shows in the status bar; in background mode the job runs to the end."""

    _timer = None

    def start(self, context):
        if bpy.app.background or context.window is None:
            try:
                while not self.finished():
                    self.step(context)
                self.on_finished(context)
            except (ServerUnavailable, ServerError, ClusterRenderError, OSError, ValueError) as e:
                self.cancel_job()  # the server stops rendering what nobody will read
                self.report({"ERROR"}, str(e))
                return {"CANCELLED"}
            self.report({"INFO"}, self.summary())
            return {"FINISHED"}
        wm = context.window_manager
        wm.progress_begin(0, max(1, self.total()))
        self._timer = wm.event_timer_add(0.02, window=context.window)
        wm.modal_handler_add(self)
        return {"RUNNING_MODAL"}

    def modal(self, context, event):
        if event.type == "ESC":
            self.cancel_job()
            return self.end(context, {"CANCELLED"}, f"cancelled; {self.summary()} (run again to resume)")
        if event.type == "TIMER":
            try:
                self.step(context)
            except (ServerUnavailable, ServerError, ClusterRenderError, OSError) as e:
                self.cancel_job()
                return self.end(context, {"CANCELLED"}, str(e), "ERROR")
            context.window_manager.progress_update(self.done())
            context.workspace.status_text_set(f"PVP: {self.done()}/{self.total()} frames — Esc to cancel")
            if self.finished():
                try:
                    self.on_finished(context)
                except (OSError, ValueError) as e:
                    return self.end(context, {"CANCELLED"}, str(e), "ERROR")
                return self.end(context, {"FINISHED"}, self.summary())
        return {"PASS_THROUGH"}

    def on_finished(self, context):
        """After the last frame (not after a cancel)."""

    def end(self, context, result, message, level="INFO"):
        wm = context.window_manager
        wm.event_timer_remove(self._timer)
        wm.progress_end()
        context.workspace.status_text_set(None)
        self.report({level}, message)
        return result


class PVP_OT_render_timeline(bpy.types.Operator, FrameStepper):
    bl_idname = "pvp.render_timeline"
    bl_label = "Render Timeline (fast)"
    bl_description = ("The server (or, with a cluster set in the preferences, pvp on Ray) renders every frame of "
                      "the scene range into PNGs in the output folder; frames already there are kept (resume); "
                      "Esc cancels")

    def execute(self, context):
        s, scene, p = runtime.session, context.scene, prefs(context)
        reader = scene_rig(self, scene)
        if reader is None:
            return {"CANCELLED"}
        if p.cluster.strip() and not scene.pvp.avatar_dir:
            self.report({"ERROR"}, f"cluster {p.cluster.strip()}: set the avatar folder (PVP panel) for cluster "
                                   "renders")
            return {"CANCELLED"}
        frames = timeline_controls(scene, reader)
        folder = bpy.path.abspath(scene.pvp.output_dir)
        size, avatar_id = scene.pvp.output_size or None, s.info["avatar"]["id"]
        if p.cluster.strip():
            try:
                self.jobs = [ClusterJob(bpy.path.abspath(p.pvp_command), bpy.path.abspath(scene.pvp.avatar_dir),
                                        p.cluster.strip(), frames, folder, size, avatar_id)]
            except ClusterRenderError as e:
                self.report({"ERROR"}, str(e))
                return {"CANCELLED"}
            return self.start(context)
        client = s.job_client()
        self.jobs = [TimelineJob(client, part, e, folder, size, avatar_id=avatar_id)
                     for e, part in runs_of_equal_edits(frames)]
        return self.start(context)

    def step(self, context):
        job = next((j for j in self.jobs if not j.finished), None)
        if job is not None:
            job.step(0.05)

    def finished(self):
        return all(j.finished for j in self.jobs)

    def total(self):
        return sum(j.total for j in self.jobs)

    def done(self):
        return sum(j.done for j in self.jobs)

    def cancel_job(self):
        for j in self.jobs:
            j.cancel()

    def summary(self):
        return f"{self.done()}/{self.total()} frames in {bpy.path.abspath(bpy.context.scene.pvp.output_dir)}"

    def on_finished(self, context):
        scene = context.scene
        if scene.pvp.movie_path:
            files = [frame_path(Path(bpy.path.abspath(scene.pvp.output_dir)), f)
                     for f in frame_range(scene.frame_start, scene.frame_end, scene.frame_step)]
            bl_movie.encode_movie(files, scene.render.fps / scene.render.fps_base,
                                  Path(bpy.path.abspath(scene.pvp.movie_path)))


class PVP_OT_render_scene(bpy.types.Operator, FrameStepper):
    bl_idname = "pvp.render_scene"
    bl_label = "Render Scene with PVP"
    bl_description = ("Blender renders the scene (Cycles, EEVEE…) frame by frame with the plane updated before "
                      "each frame, so the avatar composites with 3D content; Esc cancels")

    def execute(self, context):
        scene = context.scene
        if scene_rig(self, scene) is None:
            return {"CANCELLED"}
        self.frames = frame_range(scene.frame_start, scene.frame_end, scene.frame_step)
        self.folder = Path(bpy.path.abspath(scene.pvp.output_dir))
        self.folder.mkdir(parents=True, exist_ok=True)
        self.position = 0
        return self.start(context)

    def step(self, context):
        scene, s = context.scene, runtime.session
        f = self.frames[self.position]
        scene.frame_set(f)  # the frame-change handler asks for the avatar frame
        if not wait_for_frame(s, scene):
            raise ServerUnavailable(f"{s.status}; frames before {f} are written")
        previous = scene.render.filepath
        scene.render.filepath = str(frame_path(self.folder, f))
        try:
            bpy.ops.render.render(write_still=True)
        finally:
            scene.render.filepath = previous
        self.position += 1

    def finished(self):
        return self.position >= len(self.frames)

    def total(self):
        return len(self.frames)

    def done(self):
        return self.position

    def cancel_job(self):
        self.frames = self.frames[:self.position]

    def summary(self):
        return f"{self.position}/{len(self.frames)} frames in {self.folder}"


# --- panel -------------------------------------------------------------------------------------------------

class PVP_PT_panel(bpy.types.Panel):
    bl_label = "PVP Avatar"
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "PVP"

    def draw(self, context):
        layout, s, props = self.layout, runtime.session, context.scene.pvp
        row = layout.row()
        if s is None:
            row.label(text="not connected", icon="UNLINKED")
        else:
            icon = "ERROR" if s.preview.state == DOWN else ("LINKED" if s.info else "TIME")
            row.label(text=s.status, icon=icon)
        layout.operator("pvp.connect", icon="PLUGIN")
        col = layout.column()
        col.enabled = s is not None and s.info is not None
        col.operator("pvp.add_rig", icon="ARMATURE_DATA")
        col.operator("pvp.import_track", icon="IMPORT")
        col.operator("pvp.sync", icon="FILE_REFRESH")
        row = col.row(align=True)
        row.operator("pvp.reset", text="Reset Pose", icon="LOOP_BACK").what = "POSE"
        row.operator("pvp.reset", text="Reset Expression", icon="LOOP_BACK").what = "EXPRESSION"
        col.operator("pvp.cache_range", icon="FILE_CACHE")
        if runtime.cache_state:
            col.label(text=runtime.cache_state, icon="TIME" if runtime.cache_values is not None else "CHECKMARK")
        if s is not None and s.preview.clamped:  # the avatar shows its range's edge, not what was asked
            col.label(text=f"avatar range reached: {', '.join(s.preview.clamped)}", icon="ERROR")
        if props.rig is not None:
            for key in props.rig.keys():
                if key.startswith("pvp_edit_"):
                    col.prop(props.rig, f'["{key}"]', text=key[len("pvp_edit_"):])
        col.prop(props, "output_dir")
        col.prop(props, "output_size")
        col.prop(props, "movie_path")
        if prefs(context).cluster.strip():
            col.prop(props, "avatar_dir")
        col.operator("pvp.render_timeline", icon="RENDER_ANIMATION")
        col.operator("pvp.render_scene", icon="SCENE")


CLASSES = (PVPPreferences, PVPSceneProps, PVP_OT_connect, PVP_OT_sync, PVP_OT_add_rig, PVP_OT_reset,
           PVP_OT_cache_range, PVP_OT_import_track, PVP_OT_render_timeline, PVP_OT_render_scene, PVP_PT_panel)
HANDLERS = ((bpy.app.handlers.frame_change_post, on_frame_change), (bpy.app.handlers.render_pre, on_render_pre),
            (bpy.app.handlers.render_init, on_render_init), (bpy.app.handlers.render_complete, on_render_end),
            (bpy.app.handlers.render_cancel, on_render_end),
            (bpy.app.handlers.depsgraph_update_post, on_depsgraph_update), (bpy.app.handlers.load_post, on_load))


def register():
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.Scene.pvp = PointerProperty(type=PVPSceneProps)
    for handlers, fn in HANDLERS:
        handlers.append(fn)


def unregister():
    for handlers, fn in HANDLERS:
        if fn in handlers:
            handlers.remove(fn)
    if bpy.app.timers.is_registered(tick):
        bpy.app.timers.unregister(tick)
    runtime.close()
    del bpy.types.Scene.pvp
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
