"""The Lua scripts the index runs inside Redis (EVALSHA; redis-py reloads them after a restart).

A block's value is a string of 4-byte big-endian words, one per holder:
slot * 4 + tier code (layout.py). Reading a prompt is then one GET per key and
a little arithmetic per holder, with no per-holder strings to build.
"""

from __future__ import annotations

# Helpers shared by the scripts that read or rewrite block values.
_WORDS = """
local byte, char, floor = string.byte, string.char, math.floor
local function word_at(value, j)
  local a, b, c, d = byte(value, j, j + 3)
  return ((a * 256 + b) * 256 + c) * 256 + d
end
local function word(slot, tier)
  local v = slot * 4 + tier
  return char(floor(v / 16777216), floor(v / 65536) % 256, floor(v / 256) % 256, v % 256)
end
-- Keep the words of `value` whose slot passes `keep`, add `extra`, store it under `key`.
local function rewrite(key, value, keep, extra)
  local kept = {}
  for j = 1, #value, 4 do
    if keep(floor(word_at(value, j) / 4)) then kept[#kept + 1] = value:sub(j, j + 3) end
  end
  kept[#kept + 1] = extra
  if #kept == 0 then redis.call('DEL', key) else redis.call('SET', key, table.concat(kept)) end
end
-- Set (tier) or remove (tier nil) the word of `slot` in block `key`, and drop `sweep`'s.
local function update(key, slot, sweep, tier)
  local value = redis.call('GET', key) or ''
  rewrite(key, value, function(s) return s ~= slot and s ~= sweep end, tier and word(slot, tier))
end
"""

# Per live node: how many of the chained keys KEYS[1..n] it holds from the first
# on, and in which tiers; one round trip. ARGV[1] is the prefix of node records.
# Only the slots holding KEYS[1] can match at all, and each drops out at its first
# gap, so the loop ends once every run has. A word whose record is gone belongs
# to a dead or re-registered node: it is not counted, and deleted here. The
# record keys are not in KEYS, so this runs on a single Redis only; with Redis
# Cluster, the client pipelines the reads instead (locate.py).
# Returns, per node: id, addr, data, load, inc, exp, sig, slot, matched, then blocks in
# tier 0, 1, 2.
LOCATE = (
    _WORDS
    + """
local first = redis.call('GET', KEYS[1])
if not first then return {} end
local slots, records, runs, dead = {}, {}, {}, false
for j = 1, #first, 4 do
  local v = word_at(first, j)
  local slot = floor(v / 4)
  local record = redis.call('HMGET', ARGV[1] .. slot, 'id', 'addr', 'data', 'load', 'inc',
                            'exp', 'sig')
  if not record[1] then
    dead = true
  elseif not runs[slot] then
    runs[slot] = {1, 0, 0, 0}
    runs[slot][v % 4 + 2] = 1
    slots[#slots + 1], records[#records + 1] = slot, record
  end
end
if dead then rewrite(KEYS[1], first, function(s) return runs[s] ~= nil end) end
local live = #slots
for i = 2, #KEYS do
  if live == 0 then break end
  local value = redis.call('GET', KEYS[i])
  if not value then break end
  live = 0
  for j = 1, #value, 4 do  -- the hot loop: word_at and floor inlined (a quarter faster)
    local a, b, c, d = byte(value, j, j + 3)
    local tier = d % 4
    local run = runs[((a * 256 + b) * 256 + c) * 64 + (d - tier) / 4]
    if run and run[1] == i - 1 then
      run[1], run[tier + 2] = i, run[tier + 2] + 1
      live = live + 1
    end
  end
end
local out = {}
for n, slot in ipairs(slots) do
  for i = 1, 7 do out[#out + 1] = records[n][i] end  -- ipairs stops at a missing field
  out[#out + 1] = slot
  for _, x in ipairs(runs[slot]) do out[#out + 1] = x end
end
return out
"""
)

# A new registration of node ARGV[1]: bump its incarnation, take the next slot,
# delete the record of its previous slot (whose entries then stop counting), and
# write the new record with a TTL of ARGV[2] ms. KEYS: the incarnation hash, the
# slot counter, the id -> slot hash; ARGV[3] is the prefix of records (same hash
# tag as KEYS), ARGV[4..] the record's other fields and values (`tok` among them).
# Returns slot, incarnation, previous slot ('' if none).
REGISTER = """
local incarnation = redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
local slot = redis.call('INCR', KEYS[2])
local previous = redis.call('HGET', KEYS[3], ARGV[1])
if previous then redis.call('DEL', ARGV[3] .. previous) end
local record = ARGV[3] .. slot
redis.call('HSET', record, 'inc', incarnation, unpack(ARGV, 4))
redis.call('PEXPIRE', record, ARGV[2])
redis.call('HSET', KEYS[3], ARGV[1], slot)
return {slot, incarnation, previous or ''}
"""

# A registration is its record's random token `tok`: slot numbers start again at
# 1 when Redis restarts empty, so a node must never take a record that merely
# exists under its old slot for its own (another node may have that slot now).

# Write one batch of a node's entries, but only while its record KEYS[1] holds
# its token ARGV[1]: a batch sent just as Redis restarted empty must not land
# under a slot that now names another node. KEYS[2..]: block keys; ARGV[2]: the
# slot; ARGV[3]: a previous slot whose words in the same keys to delete, or '';
# ARGV[i + 2]: the tier code for KEYS[i], or '' to remove the entry.
# Returns 0 if the registration is gone (the node must register again), else 1.
WRITE = (
    _WORDS
    + """
if redis.call('HGET', KEYS[1], 'tok') ~= ARGV[1] then return 0 end
local slot, sweep = tonumber(ARGV[2]), tonumber(ARGV[3])
for i = 2, #KEYS do update(KEYS[i], slot, sweep, tonumber(ARGV[i + 2])) end
return 1
"""
)

# WRITE for one key, unguarded: Redis Cluster runs no script over a record and a
# block on different shards. ARGV: slot, previous slot or '', tier code or ''.
WRITE_ONE = (
    _WORDS
    + """
update(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]))
return 1
"""
)

# Refresh the TTL (ARGV[2] ms) and usage (ARGV[3..]) of the registration with
# token ARGV[1], unless it is gone (expired, or Redis restarted empty): then say
# so, so that the node registers again and re-publishes, instead of reviving a
# record whose entries readers may have deleted.
HEARTBEAT = """
if redis.call('HGET', KEYS[1], 'tok') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# Delete the record of the registration with token ARGV[1], if it is still there.
DEREGISTER = """
if redis.call('HGET', KEYS[1], 'tok') ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
"""
