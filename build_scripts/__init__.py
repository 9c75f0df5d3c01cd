"""Build tooling for TensorRT deployment (docs/tensorrt.md).

insert       `sawint4 insert`: rewrite ONNX attention into saw_int4 plugin nodes
build        `sawint4 build`: TensorRT engine (+ Triton model repository)
triton_repo  Triton Inference Server model repository generator
export       export a small Llama-architecture model to ONNX opset 23
ort_ops      onnxruntime(-extensions) Python implementations of the plugin ops
"""
