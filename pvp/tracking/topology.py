"""Landmark indices of MediaPipe's 468-point face mesh (the 10 iris points 468-477 follow them)."""

RIGHT_EYE = (33, 7, 163, 144, 145, 153, 154, 155, 133, 173, 157, 158, 159, 160, 161, 246)  # subject's right
LEFT_EYE = (362, 382, 381, 380, 374, 373, 390, 249, 263, 466, 388, 387, 386, 385, 384, 398)
MOUTH_RIGHT, MOUTH_LEFT = 61, 291
UPPER_LIP_INNER, LOWER_LIP_INNER = 13, 14
CHIN, FOREHEAD = 152, 10
EAR_RIGHT, EAR_LEFT = 234, 454  # face outline beside the ears: the jaw hinge lies near their midpoint
# Points that do not move with expressions (forehead, nose, eye corners, temples): the rigid fit uses them.
RIGID = (10, 151, 9, 8, 168, 6, 197, 195, 5, 4, 1, 19, 94, 2, 98, 327, 33, 133, 362, 263, 234, 454, 127, 356,
         109, 338, 67, 297, 103, 332, 54, 284, 21, 251, 162, 389, 226, 446, 35, 265, 143, 372, 116, 345)
NUM_MESH = 468


def mesh_triangles() -> list[tuple[int, int, int]]:
    """The 468-point mesh's triangles: the 3-cliques of MediaPipe's tessellation edges (it ships edges only)."""
    from mediapipe.python.solutions.face_mesh_connections import FACEMESH_TESSELATION

    neighbours: dict[int, set[int]] = {}
    for a, b in FACEMESH_TESSELATION:
        neighbours.setdefault(a, set()).add(b)
        neighbours.setdefault(b, set()).add(a)
    triangles = {tuple(sorted((a, b, c))) for a, b in FACEMESH_TESSELATION for c in neighbours[a] & neighbours[b]}
    return sorted(triangles)
