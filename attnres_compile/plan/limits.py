"""The ranges a plan's numbers must fall in: what real models produce, with room to spare.

A saved plan outside them is refused (plan/format.py) rather than installed: an eps of 1e9 or
10,000 blocks is a damaged or hand-edited checkpoint, not a model. `convert()` takes its options
within the same ranges, so every plan it makes can be saved and read again.
"""

MAX_CHAINS = 256            # residual streams per model (encoder-decoders have 2 or 3)
MAX_SUBLAYERS = 4096        # sublayers per stream (a 1,000-layer model with 4 per layer)
MAX_BRANCHES = 16           # residual branches added in one step (parallel attention + MLP: 2)
MAX_DIM = 1 << 18           # stream width
MIN_EPS, MAX_EPS = 1e-30, 0.1  # RMS eps of a site (norms use 1e-12 .. 1e-3)
MAX_LINE = 1_000_000        # source line numbers
MAX_OFFSET = 10_000_000     # bytecode offsets and column numbers
MAX_TEXT = 4096             # a source line's text, a string value of an example input
MAX_NAME = 512              # module paths, file names, module and class names
MAX_INPUTS = 256            # example inputs (positional plus keyword)
MAX_INPUT_DEPTH = 8         # nesting of lists, tuples and dicts in an example input
MAX_TENSOR_DIMS = 8
MAX_TENSOR_NUMEL = 1 << 26  # elements of one example tensor (rebuilt at re-derivation)
MAX_INT = 1 << 63           # plain int values of an example input
