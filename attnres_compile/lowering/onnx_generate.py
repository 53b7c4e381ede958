"""Compatibility re-export: the decoder with past lives in onnx/decoder.py."""

from ..onnx.decoder import (DecoderSpec, GenerationExportError, decoder_spec, export_decoder, export_for_generation,
                            ort_generate, write_genai_config)

__all__ = ["DecoderSpec", "GenerationExportError", "decoder_spec", "export_decoder", "export_for_generation",
           "ort_generate", "write_genai_config"]
