"""voicegate: speaker embedding and verification over gRPC, served by Triton.

Importing this package loads nothing heavy: numpy, librosa, grpc and tritonclient are imported
by the modules that need them, so `voicegate --help` stays fast.
"""

__version__ = "0.1.0"
