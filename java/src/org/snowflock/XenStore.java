package org.snowflock;

import java.io.Closeable;
import java.io.IOException;
import java.net.ConnectException;
import java.net.StandardProtocolFamily;
import java.net.UnixDomainSocketAddress;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.channels.ByteChannel;
import java.nio.channels.FileChannel;
import java.nio.channels.SocketChannel;
import java.nio.charset.StandardCharsets;
import java.nio.file.AccessDeniedException;
import java.nio.file.FileSystemException;
import java.nio.file.Files;
import java.nio.file.NoSuchFileException;
import java.nio.file.NotDirectoryException;
import java.nio.file.Path;
import java.nio.file.StandardOpenOption;
import java.util.Arrays;
import java.util.Map;

/**
 * One XenStore connection, speaking Xen's wire protocol (xs_wire.h) as c/sf-xs.c does:
 * a 16-byte header of four little-endian uint32 (type, req_id, tx_id, len), then len
 * bytes of payload, NUL-separated strings. To the guest agent's Unix socket
 * (/run/xenstored/socket, or $XENSTORED_PATH), or, when it is missing or refuses (a dead
 * agent leaves the port free), to the virtio-serial port itself; $SF_XENBUS names a port
 * or socket to use instead of both. Not thread-safe: a connection per call.
 */
final class XenStore implements Closeable {
    static final int READ = 2;
    static final int WATCH = 4;
    static final int UNWATCH = 5;
    static final int WRITE = 11;
    static final int RM = 13;
    static final int WATCH_EVENT = 15;
    static final int ERROR = 16;
    static final int HEADER = 16;
    static final int PAYLOAD_MAX = 4096; // XENSTORE_PAYLOAD_MAX
    static final String AGENT_SOCKET = "/run/xenstored/socket";
    static final String PORT = "/dev/virtio-ports/org.snowflock.xenbus";
    private static final int S_IFMT = 0170000;
    private static final int S_IFSOCK = 0140000;

    /** An error reply: its errno name, e.g. "ENOENT". */
    static final class Error extends IOException {
        private static final long serialVersionUID = 1L;
        final String errno;

        Error(String errno, int op) {
            super("XenStore error " + errno + " (request type " + op + ")");
            this.errno = errno;
        }
    }

    /** Neither the agent nor the port is there, or they refuse: no way to sfld. */
    static final class Unreachable extends IOException {
        private static final long serialVersionUID = 1L;

        Unreachable(String path, IOException cause) {
            super(cause instanceof NoSuchFileException
                    ? "no XenStore port at " + path + " (is this a SnowFlock VM?)"
                    : "cannot open the XenStore connection " + path + ": " + reason(cause), cause);
        }

        private static String reason(IOException e) {
            return e instanceof FileSystemException f && f.getReason() != null ? f.getReason()
                    : e.getMessage();
        }
    }

    private final ByteChannel channel;
    private final boolean direct; // the port itself: no agent removes our watch for us
    private int nextId = 1;
    private String watchPath;
    private String token;
    private int events; // of our watch, not yet taken by waitEvent

    private XenStore(ByteChannel channel, boolean direct) {
        this.channel = channel;
        this.direct = direct;
    }

    /** Connects as the environment says. Throws Unreachable, or IOException. */
    static XenStore open(Map<String, String> env) throws IOException {
        String port = env.get("SF_XENBUS");
        String agent = env.get("XENSTORED_PATH");
        agent = agent != null && !agent.isEmpty() ? agent : AGENT_SOCKET;
        boolean bypass = port != null && !port.isEmpty();
        if (!bypass && Files.exists(Path.of(agent))) {
            try {
                return new XenStore(connect(Path.of(agent)), false);
            } catch (Unreachable e) {
                if (!(e.getCause() instanceof ConnectException
                        || e.getCause() instanceof NoSuchFileException)) {
                    throw e;
                } // a dead agent's socket: the port is free
            }
        }
        return new XenStore(connect(Path.of(bypass ? port : PORT)), true);
    }

    private static ByteChannel connect(Path path) throws IOException {
        try {
            if (isSocket(path)) {
                SocketChannel s = SocketChannel.open(StandardProtocolFamily.UNIX);
                try {
                    s.connect(UnixDomainSocketAddress.of(path));
                } catch (IOException e) {
                    s.close();
                    throw e;
                }
                return s;
            }
            return FileChannel.open(path, StandardOpenOption.READ, StandardOpenOption.WRITE);
        } catch (NoSuchFileException | NotDirectoryException | AccessDeniedException
                | ConnectException e) {
            throw new Unreachable(path.toString(), e);
        } catch (FileSystemException e) {
            // EBUSY: another process holds the port, which admits one opener at a time.
            if (String.valueOf(e.getReason()).contains("busy")) {
                throw new Unreachable(path.toString(), e);
            }
            throw e;
        }
    }

    private static boolean isSocket(Path path) throws IOException {
        try {
            return ((Integer) Files.getAttribute(path, "unix:mode") & S_IFMT) == S_IFSOCK;
        } catch (UnsupportedOperationException | IllegalArgumentException e) {
            return !path.startsWith("/dev/"); // a JDK without the unix view: guess
        }
    }

    /**
     * Removes our watch on the port (the agent removes a client's watches itself), then
     * closes. Failures are ignored, as libsnowflock does: the call's answer is in, and
     * nothing was written that a failed close could lose.
     */
    @Override
    public void close() {
        try {
            if (direct && token != null) {
                request(UNWATCH, join(watchPath, token));
            }
        } catch (IOException e) {
            // the port's host end drops the watch with the domain's connection state
        }
        try {
            channel.close();
        } catch (IOException e) {
            // see above
        }
    }

    /** The value at path, or null if there is none (ENOENT). */
    byte[] read(String path) throws IOException {
        try {
            return request(READ, join(path));
        } catch (Error e) {
            if (e.errno.equals("ENOENT")) {
                return null;
            }
            throw e;
        }
    }

    void write(String path, byte[] value) throws IOException {
        byte[] p = join(path);
        byte[] msg = Arrays.copyOf(p, p.length + value.length);
        System.arraycopy(value, 0, msg, p.length, value.length);
        request(WRITE, msg);
    }

    void rm(String path) throws IOException {
        request(RM, join(path));
    }

    /** Watches path with token; waitEvent() then takes its events. One watch per connection. */
    void watch(String path, String token) throws IOException {
        this.watchPath = path;
        this.token = token;
        request(WATCH, join(path, token));
    }

    /** Blocks until the next event of our watch (one may have come during a request). */
    void waitEvent() throws IOException {
        while (events == 0) {
            Packet p = receive();
            if (p.op == WATCH_EVENT) {
                noteEvent(p);
            } // else a stray reply (see request): nothing waits for it
        }
        events--;
    }

    /** Sends one request and returns its reply's payload. Throws Error for an error reply. */
    byte[] request(int op, byte[] payload) throws IOException {
        int id = nextId++;
        send(op, id, payload);
        while (true) {
            Packet p = receive();
            if (p.op == WATCH_EVENT) {
                noteEvent(p);
            } else if (p.id == id) { // else a reply a killed earlier opener of the port left
                if (p.op == ERROR) {
                    throw new Error(cString(p.payload), op);
                }
                if (p.op != op) {
                    throw new IOException("protocol error: reply of type " + p.op + " to "
                            + op);
                }
                return p.payload;
            }
        }
    }

    private record Packet(int op, int id, byte[] payload) {}

    /** One write for the whole packet: the port's host end reads packets, not bytes. */
    private void send(int op, int id, byte[] payload) throws IOException {
        if (payload.length > PAYLOAD_MAX) {
            throw new IOException("a XenStore request of " + payload.length + " bytes (E2BIG)");
        }
        ByteBuffer b = ByteBuffer.allocate(HEADER + payload.length).order(ByteOrder.LITTLE_ENDIAN);
        b.putInt(op).putInt(id).putInt(0).putInt(payload.length).put(payload).flip();
        while (b.hasRemaining()) {
            channel.write(b);
        }
    }

    private Packet receive() throws IOException {
        ByteBuffer head = ByteBuffer.allocate(HEADER).order(ByteOrder.LITTLE_ENDIAN);
        readFully(head);
        int op = head.getInt(0);
        int id = head.getInt(4);
        int len = head.getInt(12);
        if (len < 0 || len > PAYLOAD_MAX) {
            throw new IOException("protocol error: a XenStore packet of " + len + " bytes");
        }
        ByteBuffer body = ByteBuffer.allocate(len);
        readFully(body);
        return new Packet(op, id, body.array());
    }

    private void readFully(ByteBuffer b) throws IOException {
        while (b.hasRemaining()) {
            if (channel.read(b) < 0) {
                throw new IOException("the XenStore connection was closed by its other end");
            }
        }
    }

    /** Counts an event of our watch: "path\0token\0". Others are not ours. */
    private void noteEvent(Packet p) {
        int nul = indexOf(p.payload, 0);
        if (token != null && nul >= 0) {
            byte[] rest = Arrays.copyOfRange(p.payload, nul + 1, p.payload.length);
            if (cString(rest).equals(token)) {
                events++;
            }
        }
    }

    private static int indexOf(byte[] b, int from) {
        for (int k = from; k < b.length; k++) {
            if (b[k] == 0) {
                return k;
            }
        }
        return -1;
    }

    /** The bytes up to the first NUL (or all), as UTF-8. */
    private static String cString(byte[] b) {
        int end = indexOf(b, 0);
        return new String(b, 0, end < 0 ? b.length : end, StandardCharsets.UTF_8);
    }

    /** Each string NUL-terminated, one after another. */
    private static byte[] join(String... parts) {
        StringBuilder s = new StringBuilder();
        for (String part : parts) {
            s.append(part).append('\0');
        }
        return s.toString().getBytes(StandardCharsets.UTF_8);
    }
}
