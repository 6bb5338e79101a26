package org.snowflock;

import java.io.File;
import java.io.FileOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.nio.file.DirectoryStream;
import java.nio.file.Files;
import java.nio.file.NoSuchFileException;
import java.nio.file.NotDirectoryException;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.concurrent.TimeUnit;
import java.util.regex.Pattern;

/**
 * What a fork leaves to the caller, as c/sf-hooks.c does it: the reseed, and in a clone
 * hooks.d/clone-post.d run as sflib.guest.hooks runs them (names matching
 * ^[A-Za-z0-9_-]+$, in byte order, executable regular files only; the environment
 * cleared but SF_* and a fixed PATH, SF_HOOKS_EVENT, SF_HOOKS_PHASE and the clone's
 * identity as SF_KEY; stdin /dev/null; 120 s each, then SIGTERM, then SIGKILL after
 * 3 s). A failing hook is said on stderr and the rest still run.
 */
final class Hooks {
    static final String DEFAULT_DIR = "/etc/snowflock/hooks.d";
    static final String PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
    static final long TIMEOUT_MS = 120_000; // per hook, as sflib.guest.hooks.TIMEOUT
    static final long GRACE_MS = 3_000; // from SIGTERM to SIGKILL, as sflib.run.KILL_GRACE
    private static final Pattern NAME = Pattern.compile("^[A-Za-z0-9_-]+$");
    private static final int SEED_MAX = 256; // bytes; sfld sends 32
    private static final int TAIL_MAX = 1024; // of a hook's stderr, for its failure's message

    private Hooks() {}

    /**
     * Mixes sfld's seed (hex) into the kernel's input pool by writing it to /dev/urandom.
     * Unlike libsnowflock this cannot then ask for a new CRNG key at once (the
     * RNDRESEEDCRNG ioctl is out of pure Java's reach): the VM's new generation ID
     * reseeds the kernel anyway, a moment later.
     */
    static void reseed(Object seed, PrintStream err) {
        if (seed == null) {
            return;
        }
        byte[] bytes = seed instanceof String s ? unhex(s) : null;
        if (bytes == null) {
            err.println("snowflock: cannot reseed the kernel's RNG: the seed is not hex");
            return;
        }
        try (FileOutputStream rng = new FileOutputStream("/dev/urandom")) {
            rng.write(bytes); // into the input pool, uncredited
        } catch (IOException e) {
            err.println("snowflock: cannot reseed the kernel's RNG: " + e.getMessage());
        }
    }

    static byte[] unhex(String hex) {
        if (hex.length() % 2 != 0 || hex.length() / 2 > SEED_MAX) {
            return null;
        }
        byte[] out = new byte[hex.length() / 2];
        for (int k = 0; k < out.length; k++) {
            int hi = Character.digit(hex.charAt(2 * k), 16);
            int lo = Character.digit(hex.charAt(2 * k + 1), 16);
            if (hi < 0 || lo < 0) {
                return null;
            }
            out[k] = (byte) (hi << 4 | lo);
        }
        return out;
    }

    /** The hooks' environment: SF_* of this one, PATH, the event, the identity. */
    static Map<String, String> environment(Map<String, String> base, String event,
            String phase, Map<String, Object> identity, Map<String, String> env) {
        env.clear();
        base.forEach((k, v) -> {
            if (k.startsWith("SF_")) {
                env.put(k, v);
            }
        });
        env.put("PATH", PATH);
        env.put("SF_HOOKS_EVENT", event);
        env.put("SF_HOOKS_PHASE", phase);
        identity.forEach((k, v) -> env.put("SF_" + upper(k), pythonStr(v)));
        return env;
    }

    /** ASCII letters upper-cased, as libsnowflock does (whatever the locale). */
    private static String upper(String s) {
        StringBuilder out = new StringBuilder(s.length());
        for (char c : s.toCharArray()) {
            out.append(c >= 'a' && c <= 'z' ? (char) (c - 'a' + 'A') : c);
        }
        return out.toString();
    }

    /** A value as Python's str() gives it (sflib.guest.hooks); nested ones as JSON. */
    static String pythonStr(Object v) {
        if (v == null) {
            return "None";
        }
        if (v instanceof Boolean b) {
            return b ? "True" : "False";
        }
        if (v instanceof String s) {
            return s;
        }
        return Json.write(v);
    }

    /** Runs hooks.d/EVENT-PHASE.d; how many failed, or -1 if the folder cannot be listed. */
    static int run(String event, String phase, Map<String, Object> identity, PrintStream err) {
        String root = System.getenv("SF_HOOKS_DIR");
        root = root != null && !root.isEmpty() ? root : DEFAULT_DIR;
        Path dir = Path.of(root, event + "-" + phase + ".d");
        List<Path> hooks;
        try {
            hooks = listed(dir);
        } catch (NoSuchFileException | NotDirectoryException e) {
            return 0;
        } catch (IOException e) {
            err.println("snowflock: cannot list the hooks in " + dir + ": " + e.getMessage());
            return -1;
        }
        int failed = 0;
        for (Path hook : hooks) {
            String why = runOne(hook, event, phase, identity);
            if (why != null) {
                err.println("snowflock: hook " + hook + " failed: " + why);
                failed++;
            }
        }
        return failed;
    }

    private static List<Path> listed(Path dir) throws IOException {
        List<String> names = new ArrayList<>();
        try (DirectoryStream<Path> entries = Files.newDirectoryStream(dir)) {
            for (Path p : entries) {
                names.add(p.getFileName().toString());
            }
        }
        names.sort(null); // byte order for these ASCII names, as Python's sorted()
        List<Path> hooks = new ArrayList<>();
        for (String name : names) {
            Path p = dir.resolve(name);
            if (NAME.matcher(name).matches() && Files.isRegularFile(p) && Files.isExecutable(p)) {
                hooks.add(p);
            }
        }
        return hooks;
    }

    /** Runs one hook to its end: null if it exited 0, else why not, in sflib.run's words. */
    private static String runOne(Path hook, String event, String phase,
            Map<String, Object> identity) {
        ProcessBuilder pb = new ProcessBuilder(hook.toString());
        environment(System.getenv(), event, phase, identity, pb.environment());
        pb.redirectInput(ProcessBuilder.Redirect.from(new File("/dev/null")));
        pb.redirectOutput(ProcessBuilder.Redirect.DISCARD);
        Process proc;
        try {
            proc = pb.start();
        } catch (IOException e) {
            return "cannot run it: " + e.getMessage();
        }
        long deadline = System.nanoTime() + TimeUnit.MILLISECONDS.toNanos(TIMEOUT_MS);
        Tail tail = new Tail(proc.getErrorStream());
        Thread reader = new Thread(tail, "snowflock-hook-stderr");
        reader.setDaemon(true);
        reader.start();
        try {
            boolean done = joinUntil(reader, deadline) && proc.waitFor(left(deadline),
                    TimeUnit.NANOSECONDS);
            if (!done) {
                stop(proc);
                return hook + " did not finish within " + TIMEOUT_MS / 1000 + " s";
            }
        } catch (InterruptedException e) {
            stop(proc);
            Thread.currentThread().interrupt();
            return "interrupted while it ran";
        }
        int status = proc.exitValue(); // 128 + N for a hook killed by signal N
        return status == 0 ? null : hook + " failed with status " + status + ": " + tail.lastLine();
    }

    private static long left(long deadline) {
        return Math.max(0, deadline - System.nanoTime());
    }

    private static boolean joinUntil(Thread t, long deadline) throws InterruptedException {
        long ms = TimeUnit.NANOSECONDS.toMillis(left(deadline));
        t.join(Math.max(1, ms));
        return !t.isAlive();
    }

    /** SIGTERM, then SIGKILL after GRACE_MS. */
    private static void stop(Process proc) {
        proc.destroy();
        try {
            if (!proc.waitFor(GRACE_MS, TimeUnit.MILLISECONDS)) {
                proc.destroyForcibly().waitFor();
            }
        } catch (InterruptedException e) {
            proc.destroyForcibly();
            Thread.currentThread().interrupt();
        }
    }

    /** Keeps the last TAIL_MAX bytes of a stream until its end. */
    private static final class Tail implements Runnable {
        private final InputStream in;
        private final byte[] tail = new byte[TAIL_MAX];
        private int len;

        Tail(InputStream in) {
            this.in = in;
        }

        @Override
        public void run() {
            byte[] buf = new byte[4096];
            try (in) {
                int n;
                while ((n = in.read(buf)) > 0) {
                    keep(buf, n);
                }
            } catch (IOException e) {
                // the hook's stderr cannot be read: its status still says how it went
            }
        }

        private synchronized void keep(byte[] buf, int n) {
            int k = Math.min(n, TAIL_MAX);
            int drop = Math.max(0, len + k - TAIL_MAX);
            System.arraycopy(tail, drop, tail, 0, len - drop);
            len -= drop;
            System.arraycopy(buf, n - k, tail, len, k);
            len += k;
        }

        /** The last line of it, as sflib.errors.CommandFailed quotes it. */
        synchronized String lastLine() {
            String text = new String(tail, 0, len, StandardCharsets.UTF_8).strip();
            if (text.isEmpty()) {
                return "no error output";
            }
            return text.substring(text.lastIndexOf('\n') + 1);
        }
    }
}
