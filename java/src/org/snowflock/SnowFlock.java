package org.snowflock;

import java.io.IOException;
import java.nio.channels.ClosedByInterruptException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Comparator;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.ThreadLocalRandom;

/**
 * The SnowFlock API for Java programs inside a guest VM: the seven calls of the paper
 * (snowflock.3java, DESIGN §1), in pure Java, as libsnowflock makes them.
 *
 * <pre>
 * Ticket ticket = SnowFlock.requestTicket(4);  // up to 4 clones; ticket.granted() of them
 * int me = SnowFlock.clone(ticket);            // 0 here, in the parent; 1.. in each clone
 * if (me &gt; 0) {
 *     render(me);
 *     SnowFlock.exit(0);                       // ends this clone; never returns
 * }
 * for (CloneStatus c : SnowFlock.join(ticket)) // waits for every clone of the ticket
 *     System.out.println(c.id() + " " + c.state() + " " + c.status());
 * </pre>
 *
 * Each call writes a request into the VM's own XenStore domain (snowflock/requests/RID,
 * JSON) through the guest agent sf-guestd, and blocks on a watch until sfld writes the
 * reply (snowflock/replies/RID). A VM fork clones the whole guest, this JVM blocked in
 * clone() included, so clone() returns in the parent and in every clone, each with its
 * own reply. Every call has its own connection and request ID and the class keeps no
 * mutable state, so threads (and processes) call at once. Interrupting a thread blocked
 * in a call closes its connection: the call throws (SYSTEM, its cause a
 * ClosedByInterruptException), though sfld may still carry the request out.
 *
 * Every call throws {@link SnowFlockException}, whose exitCode() is the guest tools' exit
 * status for the same failure.
 */
public final class SnowFlock {
    private static final String REQUESTS = "snowflock/requests/";
    private static final String REPLIES = "snowflock/replies/";
    private static final String IDENTITY = "snowflock/identity";
    private static final int ID_MAX = 63; // of a ticket or checkpoint ID, as SF_ID_MAX - 1

    private SnowFlock() {}

    /**
     * Reserves resources for up to n clones. Throws USAGE for n &lt; 1, WRONG_STATE when no
     * clone slot is free.
     */
    public static Ticket requestTicket(int n) throws SnowFlockException {
        Map<String, Object> r = object(request("ticket", args("n", n)));
        String id = ticketId(r.get("ticket"));
        return new Ticket(id, integer(r, "granted", 0), integer(r, "requested", 0));
    }

    /**
     * Clones this VM with ticket (once per ticket). Returns 0 in the parent, and in each
     * clone its ID (1..granted), after the seed was mixed in and hooks.d/clone-post.d ran.
     * Flushes System.out and System.err first, so that no clone writes their buffered
     * output again.
     */
    public static int clone(Ticket ticket) throws SnowFlockException {
        String id = check(ticket);
        flush();
        Map<String, Object> r = object(request("clone", args("ticket", id)));
        int me = integer(r, "id", 0);
        afterFork(r.get("seed"), me);
        return me;
    }

    /**
     * Makes an immutable checkpoint of this VM. Returns (name, 0) now; clones that
     * createClones() makes from it later return from here with (name, their ID), after
     * their hooks ran.
     */
    public static Checkpoint checkpointParent() throws SnowFlockException {
        flush();
        Map<String, Object> r = object(request("checkpoint", args()));
        String name = ticketId(r.get("checkpoint"));
        int me = integer(r, "id", 0);
        afterFork(r.get("seed"), me);
        return new Checkpoint(name, me);
    }

    /** Creates ticket's clones from checkpoint; they resume in checkpointParent(). */
    public static void createClones(String checkpoint, Ticket ticket)
            throws SnowFlockException {
        if (checkpoint == null || checkpoint.isEmpty()) {
            throw new SnowFlockException(SnowFlockException.USAGE, "no checkpoint given", null);
        }
        String id = check(ticket);
        Map<String, Object> r = object(request("create_clones",
                args("checkpoint", checkpoint, "ticket", id)));
        if (integer(r, "id", 0) != 0) { // the parent's ID: its clones return elsewhere
            throw protocol("create_clones answered with a clone's ID");
        }
    }

    /**
     * Ends this clone; the parent's join() reports status (0-255). Never returns once sfld
     * took the request: the thread waits until sfld stops the VM. Flushes System.out and
     * System.err first. Throws WRONG_STATE in the parent, which is no clone.
     */
    public static void exit(int status) throws SnowFlockException {
        flush(); // sfld stops the VM: nothing buffered would ever be written
        request("exit", args("status", status));
        while (true) {
            try {
                Thread.sleep(3_600_000);
            } catch (InterruptedException e) {
                // sfld is stopping this VM: there is nothing to return to
            }
        }
    }

    /**
     * Waits until every clone of ticket has ended; the ticket is then used up. Returns
     * every clone, sorted by ID. Throws NOT_FOUND for an unknown ticket, WRONG_STATE in a
     * clone.
     */
    public static List<CloneStatus> join(Ticket ticket) throws SnowFlockException {
        return clones(object(request("join", args("ticket", check(ticket)))));
    }

    /**
     * Kills every clone of ticket at once and invalidates it. Returns every clone, as
     * join() does: those it killed have the state "killed".
     */
    public static List<CloneStatus> kill(Ticket ticket) throws SnowFlockException {
        return clones(object(request("kill", args("ticket", check(ticket)))));
    }

    // The request ---------------------------------------------------------------------

    /** Sends op to sfld and waits for its reply: its result, or sfld's error thrown. */
    static Object request(String op, Map<String, Object> args) throws SnowFlockException {
        Map<String, Object> msg = new LinkedHashMap<>();
        msg.put("op", op);
        msg.put("args", args);
        byte[] raw = exchange(newRid(), Json.write(msg).getBytes(StandardCharsets.UTF_8));
        return decodeReply(raw);
    }

    /**
     * As sflib.guest.api.request: watch the reply key first and take the watch's initial
     * event, so that no reply comes unseen; write the request; on each event read the
     * reply key until it holds a value (an event may come before it); remove it.
     */
    private static byte[] exchange(String rid, byte[] msg) throws SnowFlockException {
        try (XenStore x = XenStore.open(System.getenv())) {
            x.watch(REPLIES + rid, rid);
            x.waitEvent(); // the watch's initial event
            x.write(REQUESTS + rid, msg);
            byte[] reply;
            do {
                x.waitEvent();
                reply = x.read(REPLIES + rid);
            } while (reply == null || reply.length == 0); // sfld's replies are never empty
            try {
                x.rm(REPLIES + rid);
            } catch (XenStore.Error e) {
                if (!e.errno.equals("ENOENT")) {
                    throw e;
                }
            }
            return reply;
        } catch (IOException e) {
            throw local(e);
        }
    }

    private static SnowFlockException local(IOException e) {
        if (e instanceof XenStore.Unreachable) {
            return new SnowFlockException(SnowFlockException.UNREACHABLE, e.getMessage(), e);
        }
        if (e instanceof ClosedByInterruptException) {
            return new SnowFlockException(SnowFlockException.SYSTEM,
                    "interrupted while waiting for sfld's reply", e);
        }
        return new SnowFlockException(SnowFlockException.SYSTEM,
                "cannot talk to sfld through XenStore: " + e, e);
    }

    /**
     * A fresh request ID: unique per call, per thread and per process. Not SecureRandom:
     * it only has to be unique within this VM's domain, and loading the security
     * providers costs a JVM under TCG a good part of a second.
     */
    private static String newRid() {
        long r = ThreadLocalRandom.current().nextLong() ^ System.nanoTime();
        String hex = Long.toHexString(r); // not String.format: its Formatter, regex and
        hex = "0000000000000000".substring(hex.length()) + hex; // locale data load slowly
        return pid() + "-" + Thread.currentThread().getId() + "-" + hex;
    }

    /**
     * This process's ID, from /proc/self: ProcessHandle.current() starts ProcessHandleImpl's
     * machinery (an executor, lambdas), which a JVM under TCG takes long to load.
     */
    private static String pid() {
        try {
            return Files.readSymbolicLink(Path.of("/proc/self")).toString();
        } catch (IOException | UnsupportedOperationException e) {
            return Long.toString(ProcessHandle.current().pid()); // no /proc mounted
        }
    }

    /** The result of sfld's reply, or its error (type, message, hint) thrown. */
    static Object decodeReply(byte[] raw) throws SnowFlockException {
        Map<String, Object> reply = object(parse(raw));
        Object ok = reply.get("ok");
        if (Boolean.TRUE.equals(ok)) {
            return reply.get("result");
        }
        if (!Boolean.FALSE.equals(ok)) {
            throw protocol("a reply without \"ok\"");
        }
        Map<String, Object> error = reply.get("error") instanceof Map<?, ?> ? object(
                reply.get("error")) : Map.of();
        Object message = error.get("message");
        Object hint = error.get("hint");
        String text = String.valueOf(message instanceof String ? message : "None");
        if (hint instanceof String h && !h.isEmpty()) {
            text += " (" + h + ")";
        }
        Object type = error.get("type");
        throw new SnowFlockException(type instanceof String t ? t : null, text);
    }

    // After a fork ----------------------------------------------------------------------

    /** What every member of a family does after a fork, before the call returns. */
    private static void afterFork(Object seed, int id) {
        Hooks.reseed(seed, System.err);
        if (id > 0) {
            Hooks.run("clone", "post", identity(), System.err); // failures said on stderr
        }
    }

    /**
     * This clone's identity (snowflock/identity), or an empty map when there is none or it
     * cannot be read (said on stderr): the hooks run anyway.
     */
    private static Map<String, Object> identity() {
        byte[] raw;
        try (XenStore x = XenStore.open(System.getenv())) {
            raw = x.read(IDENTITY);
        } catch (IOException e) {
            System.err.println("snowflock: cannot read this clone's identity: " + e.getMessage());
            return Map.of();
        }
        if (raw == null || raw.length == 0) {
            return Map.of();
        }
        try {
            return object(parse(raw));
        } catch (SnowFlockException e) {
            System.err.println("snowflock: cannot read this clone's identity: not a JSON object");
            return Map.of();
        }
    }

    private static void flush() {
        System.out.flush();
        System.err.flush();
    }

    // Results -----------------------------------------------------------------------------

    private static Map<String, Object> args(Object... kv) {
        Map<String, Object> m = new LinkedHashMap<>();
        for (int k = 0; k < kv.length; k += 2) {
            m.put((String) kv[k], kv[k + 1]);
        }
        return m;
    }

    private static String check(Ticket ticket) throws SnowFlockException {
        if (ticket == null || ticket.id() == null || ticket.id().isEmpty()) {
            throw new SnowFlockException(SnowFlockException.USAGE, "no ticket given", null);
        }
        return ticket.id();
    }

    private static Object parse(byte[] raw) throws SnowFlockException {
        try {
            return Json.parse(new String(raw, StandardCharsets.UTF_8));
        } catch (Json.Malformed e) {
            throw protocol("a reply that is not JSON: " + e.getMessage());
        }
    }

    @SuppressWarnings("unchecked")
    private static Map<String, Object> object(Object v) throws SnowFlockException {
        if (v instanceof Map<?, ?> m) {
            return (Map<String, Object>) m;
        }
        throw protocol("a reply whose result is not an object");
    }

    private static int integer(Map<String, Object> m, String key, int min)
            throws SnowFlockException {
        Long v = m.get(key) instanceof Json.Num n ? n.asLong(min, Integer.MAX_VALUE) : null;
        if (v == null) {
            throw protocol("a reply without an integer " + key);
        }
        return v.intValue();
    }

    private static String ticketId(Object v) throws SnowFlockException {
        if (v instanceof String s && !s.isEmpty() && s.length() <= ID_MAX) {
            return s;
        }
        throw protocol("a reply without a ticket or checkpoint ID");
    }

    /** A ticket's "clones" (Clone.to_json of each), sorted by ID. */
    private static List<CloneStatus> clones(Map<String, Object> r) throws SnowFlockException {
        if (!(r.get("clones") instanceof Map<?, ?> all)) {
            throw protocol("a reply without clones");
        }
        List<CloneStatus> out = new ArrayList<>();
        for (Object c : all.values()) {
            Map<String, Object> clone = object(c);
            Object state = clone.get("state");
            if (!(state instanceof String s) || !clone.containsKey("status")) {
                throw protocol("a clone without its state and status");
            }
            int status = clone.get("status") == null ? -1 : integer(clone, "status", 0);
            out.add(new CloneStatus(integer(clone, "id", 1), s, status));
        }
        out.sort(Comparator.comparingInt(CloneStatus::id));
        return out;
    }

    private static SnowFlockException protocol(String what) {
        return new SnowFlockException(SnowFlockException.SYSTEM,
                "protocol error: sfld sent " + what, null);
    }
}
