"""pvp for Blender: a FLAME-like rig whose values drive a pvp avatar server, shown live on an image plane.

The add-on talks to ``pvp serve`` over ZeroMQ (protocol.py and client.py are the server project's own
modules, copied in by build_addon.py); it never imports torch.
"""


def register():
    from . import bl_ops

    bl_ops.register()


def unregister():
    from . import bl_ops

    bl_ops.unregister()
