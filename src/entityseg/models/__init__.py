"""Network modules: backbone, pixel decoder, image/batch decoders, association and heads."""
