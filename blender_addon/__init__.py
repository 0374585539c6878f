"""pvp for Blender: a FLAME-like rig whose values drive a pvp avatar server, shown live on an image plane.

The add-on talks to ``pvp serve`` over ZeroMQ through the ``pvp_contract`` package (wire protocol, client,
control schema, driving-track readers), which the extension ships as a wheel; it never imports torch.
"""


def register():
    from . import bl_ops

    bl_ops.register()


def unregister():
    from . import bl_ops

    bl_ops.unregister()
