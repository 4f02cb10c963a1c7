"""ONNX Runtime encoders (text -> dense and sparse vectors). Imports neither service nor index."""
