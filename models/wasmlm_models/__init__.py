"""wasmlm's model pipeline: model reference -> bundle folder (ONNX files, tokenizer, manifest)
-> native baseline table. Driven by build.sh; see README.md."""
