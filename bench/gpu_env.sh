# Sourced by the GPU scripts on the GPU machine: the carried wheels (lpips, tflite, pyzmq) installed to
# /tmp/site and a minimal `mediapipe` package holding what pvp reads from it as files (the landmark .tflite
# the differentiable tracker runs, the mesh topology an avatar saves): mediapipe 0.10 does not install
# beside the machine's numpy 2. Needs bench/work/gpu and .whl carried (bench/fit_gpu.sh --prepare).
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || exit 1
STUB=/tmp/mp/mediapipe/modules/face_landmark
mkdir -p "$STUB" /tmp/mp/mediapipe/python/solutions && cp bench/work/gpu/face_landmark.tflite "$STUB/" || exit 1
touch /tmp/mp/mediapipe/__init__.py /tmp/mp/mediapipe/python/__init__.py /tmp/mp/mediapipe/python/solutions/__init__.py
cp bench/work/gpu/face_mesh_connections.py /tmp/mp/mediapipe/python/solutions/ || exit 1
export PYTHONPATH="/tmp/site:/tmp/mp" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
