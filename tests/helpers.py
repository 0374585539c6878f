"""Assertions shared by several test modules."""
import numpy as np


def assert_same_render(got: np.ndarray, want: np.ndarray) -> None:
    """Equal up to the last bit of a few pixels: a frame rendered in a batch of several and the same frame
    rendered alone go through differently blocked float GEMMs on the CPU."""
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99, (diff.max(), (diff == 0).mean())


def blender_bone_frame(head, tail) -> np.ndarray:
    """A bone's rest axes (columns X, Y, Z in armature space) as Blender builds them for roll 0
    (vec_roll_to_mat3_normalized): Y along the bone; a bone along -Y is a half turn about Z."""
    x, y, z = (np.asarray(tail, float) - np.asarray(head, float)) / np.linalg.norm(np.subtract(tail, head))
    if x * x + z * z < 2.5e-4 ** 2 and y < 0:
        return np.diag([-1.0, -1.0, 1.0])
    theta = 1.0 + y
    return np.array([[1 - x * x / theta, x, -x * z / theta],
                     [-x, y, -z],
                     [-x * z / theta, z, 1 - z * z / theta]])


def plane_pixels(image) -> np.ndarray:
    """A Blender image (the PVP plane's) as uint8 RGB rows top-down, as the server sent them."""
    w, h = image.size
    px = np.empty(w * h * 4, np.float32)
    image.pixels.foreach_get(px)
    return np.round(px.reshape(h, w, 4)[::-1, :, :3] * 255).astype(np.uint8)


def server_frame(endpoint, controls, edits=None) -> np.ndarray:
    """The server's own render of these values (uncached), uint8 RGB [H, W, 3]."""
    from pvp_contract.client import Client

    frame = Client(endpoint, 20.0).render(controls, edits, use_cache=False)
    return np.frombuffer(frame.data, np.uint8).reshape(frame.height, frame.width, 3)


def install_extension(blender, addon_zip) -> None:
    """Install and enable the extension zip with Blender's own operators (BLENDER_USER_RESOURCES set first)."""
    blender.ops.wm.read_factory_settings(use_empty=True)
    result = blender.ops.extensions.package_install_files(filepath=str(addon_zip), repo="user_default",
                                                          enable_on_install=True)
    assert result == {"FINISHED"}, result
