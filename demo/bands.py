"""The farm's image plumbing, in the guest (Python's standard library only).

    bands.py crop FULL.ppm FIRST LAST OUT.ppm   rows FIRST..LAST (1-based) of a render
    bands.py join OUT.png BAND.ppm...           stack bands top to bottom into a PNG
"""

import struct
import sys
import zlib


def read_ppm(path):
    data = open(path, "rb").read()
    fields, pos = [], 0
    while len(fields) < 4:  # magic, width, height, maxval; comments skipped
        while data[pos:pos + 1].isspace():
            pos += 1
        if data[pos:pos + 1] == b"#":
            pos = data.index(b"\n", pos) + 1
            continue
        end = pos
        while not data[end:end + 1].isspace():
            end += 1
        fields.append(data[pos:end])
        pos = end
    assert fields[0] == b"P6" and fields[3] == b"255", fields
    width, height = int(fields[1]), int(fields[2])
    pixels = data[pos + 1:]
    return width, height, [pixels[r * width * 3:(r + 1) * width * 3] for r in range(height)]


def write_ppm(path, width, rows):
    with open(path, "wb") as out:
        out.write(b"P6\n%d %d\n255\n" % (width, len(rows)) + b"".join(rows))


def write_png(path, width, rows):
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    raw = b"".join(b"\0" + row for row in rows)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, len(rows), 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    open(path, "wb").write(png)


def main(argv):
    if argv[0] == "crop":
        width, height, rows = read_ppm(argv[1])
        first, last = int(argv[2]), int(argv[3])
        # POV-Ray may write the whole frame or just the rows it rendered.
        band = rows[first - 1:last] if height > last - first + 1 else rows
        write_ppm(argv[4], width, band)
    elif argv[0] == "join":
        width, rows = 0, []
        for band in argv[2:]:
            width, _, band_rows = read_ppm(band)
            rows += band_rows
        write_png(argv[1], width, rows)
    return 0


sys.exit(main(sys.argv[1:]))
