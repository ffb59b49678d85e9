"""What one request may ask of a node. Each bound keeps the daemon's cost of a request
(memory to parse it, CPU to answer it) within a few MB and milliseconds, whatever the
caller sends; clients split larger batches into requests within them."""

MAX_BLOCKS = 16384  # keys, or declared blocks, in one request
MAX_TOKENS = 1 << 20  # token ids in one lookup
MAX_SALT = 1024  # bytes of a lookup's salt (it is hashed into every block's key)
MAX_RANK = 16  # dimensions of a block's shape
MAX_NAME = 64  # characters of a block's dtype or layout name
MAX_HEADER_FRAME = 4 << 20  # bytes of one frame of block headers, refused before parsing
BLOCK_OVERHEAD = 512  # bytes of index and metadata a host-tier block costs beside its slot
MAX_WAITING = 8  # puts that may wait for room in the host tier at once; more are refused
