/**
 * A small, checked zip reader and writer: enough for PyTorch's zip serialisation (torch.save since
 * 1.6), whose archives hold STORED records, 64-byte aligned, with a ZIP64 end record.
 *
 * Reader: end of central directory (ZIP64 records where present), central directory, local
 * headers; STORED and DEFLATE (node:zlib inflateRawSync) entries; CRC-32 verified. Every failure
 * is a ZipError naming the file (and the entry), never an out-of-range read.
 *
 * Writer: STORED entries laid out as PyTorch's writer (miniz) lays them out: local header with
 * flag 0x0808 (data descriptor, UTF-8 names) and zero CRC/sizes, an "FB" extra field of 'Z'
 * padding so that each record's data starts at a multiple of 64 bytes, the data, a data
 * descriptor, then the central directory, a ZIP64 end record and locator, and the end record.
 */
import * as fs from 'node:fs';
import * as zlib from 'node:zlib';
import { crc32 } from '../util/crc32';

export class ZipError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ZipError';
  }
}

const SIG_LOCAL = 0x04034b50;
const SIG_CENTRAL = 0x02014b50;
const SIG_EOCD = 0x06054b50;
const SIG_ZIP64_EOCD = 0x06064b50;
const SIG_ZIP64_LOCATOR = 0x07064b50;
const SIG_DESCRIPTOR = 0x08074b50;

export interface ZipEntry {
  name: string;
  /** 0 = STORED, 8 = DEFLATE. */
  method: number;
  flags: number;
  crc32: number;
  compressedSize: number;
  size: number;
  localHeaderOffset: number;
}

/** Whether `buf` starts like a zip archive (a local file header, or an empty archive). */
export function looksLikeZip(buf: Uint8Array): boolean {
  if (buf.length < 4) return false;
  const sig = (buf[0] | (buf[1] << 8) | (buf[2] << 16) | (buf[3] << 24)) >>> 0;
  return sig === SIG_LOCAL || sig === SIG_EOCD;
}

function u64(buf: Buffer, at: number, what: string, source: string): number {
  const v = buf.readBigUInt64LE(at);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new ZipError(`${source}: corrupt zip archive (${what} ${v} is out of range)`);
  return Number(v);
}

export class ZipReader {
  private readonly byName = new Map<string, ZipEntry>();
  /** Where the central directory starts: no entry's data may run past it. */
  private readonly cdOffset: number;

  private constructor(
    readonly source: string,
    private readonly buf: Buffer,
    readonly entries: readonly ZipEntry[],
    cdOffset: number,
  ) {
    this.cdOffset = cdOffset;
    for (const e of entries) {
      if (this.byName.has(e.name)) throw new ZipError(`${source}: corrupt zip archive (duplicate entry '${e.name}')`);
      this.byName.set(e.name, e);
    }
  }

  static open(file: string): ZipReader {
    if (!fs.existsSync(file)) throw new ZipError(`${file}: no such file`);
    return ZipReader.fromBuffer(fs.readFileSync(file), file);
  }

  /** Parses the archive's directory; `source` names the file in every error. */
  static fromBuffer(input: Uint8Array, source: string): ZipReader {
    const buf = Buffer.isBuffer(input) ? input : Buffer.from(input.buffer, input.byteOffset, input.byteLength);
    const len = buf.length;
    // The end record is 22 bytes plus a comment of up to 65535 bytes, at the very end.
    let eocd = -1;
    for (let p = len - 22; p >= 0 && p >= len - 22 - 0xffff; p--) {
      if (buf.readUInt32LE(p) === SIG_EOCD && p + 22 + buf.readUInt16LE(p + 20) <= len) {
        eocd = p;
        break;
      }
    }
    if (eocd < 0) {
      const hint = looksLikeZip(buf) ? 'truncated zip archive' : 'not a zip archive';
      throw new ZipError(`${source}: ${hint} (no end of central directory record)`);
    }
    const disk = buf.readUInt16LE(eocd + 4);
    const cdDisk = buf.readUInt16LE(eocd + 6);
    let count = buf.readUInt16LE(eocd + 10);
    let cdSize = buf.readUInt32LE(eocd + 12);
    let cdOffset = buf.readUInt32LE(eocd + 16);
    let cdLimit = eocd;
    if (disk !== 0 || cdDisk !== 0) throw new ZipError(`${source}: multi-disk zip archives are not supported`);
    // ZIP64: a locator just before the end record points at the ZIP64 end record.
    const loc = eocd - 20;
    if (loc >= 0 && buf.readUInt32LE(loc) === SIG_ZIP64_LOCATOR) {
      const z64 = u64(buf, loc + 8, 'ZIP64 end record offset', source);
      if (z64 + 56 > loc || buf.readUInt32LE(z64) !== SIG_ZIP64_EOCD) {
        throw new ZipError(`${source}: corrupt zip archive (bad ZIP64 end of central directory record)`);
      }
      count = u64(buf, z64 + 32, 'entry count', source);
      cdSize = u64(buf, z64 + 40, 'central directory size', source);
      cdOffset = u64(buf, z64 + 48, 'central directory offset', source);
      cdLimit = z64;
    } else if (count === 0xffff || cdSize === 0xffffffff || cdOffset === 0xffffffff) {
      throw new ZipError(`${source}: corrupt zip archive (ZIP64 fields without a ZIP64 locator)`);
    }
    if (cdOffset + cdSize > cdLimit) {
      throw new ZipError(
        `${source}: corrupt or truncated zip archive (central directory at ${cdOffset}+${cdSize} runs past ${cdLimit})`,
      );
    }
    if (count > cdSize / 46) throw new ZipError(`${source}: corrupt zip archive (${count} entries cannot fit in ${cdSize} bytes)`);
    const entries: ZipEntry[] = [];
    let p = cdOffset;
    const end = cdOffset + cdSize;
    for (let i = 0; i < count; i++) {
      if (p + 46 > end || buf.readUInt32LE(p) !== SIG_CENTRAL) {
        throw new ZipError(`${source}: corrupt zip archive (bad central directory header ${i} at offset ${p})`);
      }
      const flags = buf.readUInt16LE(p + 8);
      const method = buf.readUInt16LE(p + 10);
      const crc = buf.readUInt32LE(p + 16);
      let compressedSize = buf.readUInt32LE(p + 20);
      let size = buf.readUInt32LE(p + 24);
      const nameLen = buf.readUInt16LE(p + 28);
      const extraLen = buf.readUInt16LE(p + 30);
      const commentLen = buf.readUInt16LE(p + 32);
      const diskStart = buf.readUInt16LE(p + 34);
      let localHeaderOffset = buf.readUInt32LE(p + 42);
      const next = p + 46 + nameLen + extraLen + commentLen;
      if (next > end) throw new ZipError(`${source}: corrupt zip archive (central directory header ${i} runs past the directory)`);
      const name = buf.toString('utf8', p + 46, p + 46 + nameLen);
      // ZIP64 extended information: only the fields whose 32-bit slot is saturated, in order.
      let x = p + 46 + nameLen;
      const xEnd = x + extraLen;
      while (x + 4 <= xEnd) {
        const id = buf.readUInt16LE(x);
        const sz = buf.readUInt16LE(x + 2);
        if (x + 4 + sz > xEnd) throw new ZipError(`${source}: corrupt zip archive (extra field of '${name}' runs past its header)`);
        if (id === 0x0001) {
          let q = x + 4;
          const take = (what: string): number => {
            if (q + 8 > x + 4 + sz) throw new ZipError(`${source}: corrupt zip archive (short ZIP64 field for '${name}')`);
            const v = u64(buf, q, what, source);
            q += 8;
            return v;
          };
          if (size === 0xffffffff) size = take('size');
          if (compressedSize === 0xffffffff) compressedSize = take('compressed size');
          if (localHeaderOffset === 0xffffffff) localHeaderOffset = take('local header offset');
        }
        x += 4 + sz;
      }
      if (diskStart !== 0 && diskStart !== 0xffff) throw new ZipError(`${source}: multi-disk zip archives are not supported`);
      if (localHeaderOffset + 30 > cdOffset) {
        throw new ZipError(`${source}: corrupt zip archive (entry '${name}' has local header offset ${localHeaderOffset} past the data)`);
      }
      entries.push({ name, method, flags, crc32: crc, compressedSize, size, localHeaderOffset });
      p = next;
    }
    return new ZipReader(source, buf, entries, cdOffset);
  }

  names(): string[] {
    return this.entries.map((e) => e.name);
  }

  has(name: string): boolean {
    return this.byName.has(name);
  }

  entry(name: string): ZipEntry {
    const e = this.byName.get(name);
    if (!e) throw new ZipError(`${this.source}: no entry '${name}' in the zip archive`);
    return e;
  }

  /** Where an entry's (compressed) data starts, after checking its local header. */
  dataOffset(name: string): number {
    const e = this.entry(name);
    const p = e.localHeaderOffset;
    if (this.buf.readUInt32LE(p) !== SIG_LOCAL) {
      throw new ZipError(`${this.source}: corrupt zip archive (bad local header for entry '${name}' at offset ${p})`);
    }
    const start = p + 30 + this.buf.readUInt16LE(p + 26) + this.buf.readUInt16LE(p + 28);
    if (start + e.compressedSize > this.cdOffset) {
      throw new ZipError(`${this.source}: corrupt or truncated zip archive (data of entry '${name}' runs past the archive data)`);
    }
    return start;
  }

  /**
   * An entry's contents. STORED entries are a view into the archive buffer (copy before
   * mutating); the CRC-32 is checked unless `verify` is false.
   */
  read(name: string, verify = true): Buffer {
    const e = this.entry(name);
    if (e.flags & 1) throw new ZipError(`${this.source}: entry '${name}' is encrypted; not supported`);
    const start = this.dataOffset(name);
    const raw = this.buf.subarray(start, start + e.compressedSize);
    let out: Buffer;
    if (e.method === 0) {
      if (e.size !== e.compressedSize) {
        throw new ZipError(`${this.source}: corrupt zip archive (stored entry '${name}' has size ${e.size} != ${e.compressedSize})`);
      }
      out = raw;
    } else if (e.method === 8) {
      try {
        out = zlib.inflateRawSync(raw, { maxOutputLength: Math.max(1, e.size) });
      } catch (err) {
        throw new ZipError(`${this.source}: corrupt zip archive (cannot inflate entry '${name}': ${(err as Error).message})`);
      }
      if (out.length !== e.size) {
        throw new ZipError(`${this.source}: corrupt zip archive (entry '${name}' inflates to ${out.length} bytes, expected ${e.size})`);
      }
    } else {
      throw new ZipError(`${this.source}: entry '${name}' uses compression method ${e.method}; only STORED and DEFLATE are supported`);
    }
    if (verify && crc32(out) !== e.crc32) throw new ZipError(`${this.source}: corrupt zip archive (CRC-32 mismatch in entry '${name}')`);
    return out;
  }
}

export interface ZipWriteEntry {
  name: string;
  data: Uint8Array;
}

/** Builds a STORED zip archive laid out as PyTorch writes its records (see the file comment). */
export function encodeZip(entries: readonly ZipWriteEntry[], align = 64): Buffer {
  const parts: Buffer[] = [];
  const central: Buffer[] = [];
  let offset = 0;
  const seen = new Set<string>();
  for (const { name, data } of entries) {
    if (seen.has(name)) throw new ZipError(`zip writer: duplicate entry '${name}'`);
    seen.add(name);
    const nameBytes = Buffer.from(name, 'utf8');
    if (nameBytes.length > 0xffff) throw new ZipError(`zip writer: entry name too long ('${name.slice(0, 40)}...')`);
    if (data.length >= 0xffffffff) throw new ZipError(`zip writer: entry '${name}' is too large (${data.length} bytes)`);
    const base = offset + 30 + nameBytes.length + 4;
    const pad = (align - (base % align)) % align;
    const local = Buffer.alloc(30 + nameBytes.length + 4 + pad, 'Z');
    local.writeUInt32LE(SIG_LOCAL, 0);
    local.writeUInt16LE(0, 4); // version needed (as PyTorch's writer)
    local.writeUInt16LE(0x0808, 6); // data descriptor follows; UTF-8 name
    local.writeUInt16LE(0, 8); // STORED
    local.fill(0, 10, 26); // time, date, CRC and sizes: in the descriptor
    local.writeUInt16LE(nameBytes.length, 26);
    local.writeUInt16LE(4 + pad, 28);
    nameBytes.copy(local, 30);
    local.write('FB', 30 + nameBytes.length, 'ascii');
    local.writeUInt16LE(pad, 30 + nameBytes.length + 2);
    const crc = crc32(data);
    const desc = Buffer.alloc(16);
    desc.writeUInt32LE(SIG_DESCRIPTOR, 0);
    desc.writeUInt32LE(crc, 4);
    desc.writeUInt32LE(data.length, 8);
    desc.writeUInt32LE(data.length, 12);
    if (offset > 0xfffffffe) throw new ZipError(`zip writer: archive too large for 32-bit offsets at entry '${name}'`);
    const cd = Buffer.alloc(46 + nameBytes.length);
    cd.writeUInt32LE(SIG_CENTRAL, 0);
    cd.writeUInt16LE(0, 4); // made by
    cd.writeUInt16LE(0, 6); // needed
    cd.writeUInt16LE(0x0808, 8);
    cd.writeUInt16LE(0, 10);
    cd.writeUInt32LE(0, 12); // time, date
    cd.writeUInt32LE(crc, 16);
    cd.writeUInt32LE(data.length, 20);
    cd.writeUInt32LE(data.length, 24);
    cd.writeUInt16LE(nameBytes.length, 28);
    // extra, comment, disk, internal and external attributes: 0
    cd.writeUInt32LE(offset, 42);
    nameBytes.copy(cd, 46);
    central.push(cd);
    parts.push(local, Buffer.from(data.buffer, data.byteOffset, data.byteLength), desc);
    offset += local.length + data.length + desc.length;
  }
  const cdOffset = offset;
  const cdSize = central.reduce((a, b) => a + b.length, 0);
  const z64 = Buffer.alloc(56);
  z64.writeUInt32LE(SIG_ZIP64_EOCD, 0);
  z64.writeBigUInt64LE(44n, 4);
  z64.writeUInt16LE(0x031e, 12);
  z64.writeUInt16LE(0x002d, 14);
  z64.writeBigUInt64LE(BigInt(entries.length), 24);
  z64.writeBigUInt64LE(BigInt(entries.length), 32);
  z64.writeBigUInt64LE(BigInt(cdSize), 40);
  z64.writeBigUInt64LE(BigInt(cdOffset), 48);
  const locator = Buffer.alloc(20);
  locator.writeUInt32LE(SIG_ZIP64_LOCATOR, 0);
  locator.writeBigUInt64LE(BigInt(cdOffset + cdSize), 8);
  locator.writeUInt32LE(1, 16);
  const eocd = Buffer.alloc(22);
  eocd.writeUInt32LE(SIG_EOCD, 0);
  eocd.writeUInt16LE(Math.min(entries.length, 0xffff), 8);
  eocd.writeUInt16LE(Math.min(entries.length, 0xffff), 10);
  eocd.writeUInt32LE(Math.min(cdSize, 0xffffffff), 12);
  eocd.writeUInt32LE(Math.min(cdOffset, 0xffffffff), 16);
  return Buffer.concat([...parts, ...central, z64, locator, eocd]);
}
