package org.snowflock.test;

import java.util.ArrayList;
import java.util.List;
import org.snowflock.Checkpoint;
import org.snowflock.CloneStatus;
import org.snowflock.SnowFlock;
import org.snowflock.SnowFlockException;
import org.snowflock.Ticket;

/**
 * Each call of the Java binding from the command line, for tests without a VM
 * (tests/integration/test_java_agent.py drives it against the real agent and a fake
 * sfld), as build/sf-cdrive does for C. One line per result:
 *
 * <pre>
 *   ticket N            TICKET ID GRANTED REQUESTED
 *   clone TICKET        ID N
 *   checkpoint          CKPT NAME ID
 *   create CKPT TICKET  CREATED
 *   join TICKET         CLONE ID STATE STATUS ..., then COUNT N
 *   kill TICKET         KILLED N (how many it killed)
 *   exit STATUS         (never returns)
 *   threads N           N threads at once, each: a ticket for 1, then join it;
 *                       THREAD K TICKET COUNT per thread, then ELAPSED-MS X
 *   bench N [TICKET]    N tickets in a row (or N joins of TICKET, whatever their
 *                       outcome: one round trip each) after one more, the JVM's first
 *                       (class loading, the interpreter); MEAN-MS X FIRST-MS Y
 *   codes               CODE NAME VALUE for each of SnowFlockException's codes
 *   start               STARTED (what a JVM costs to start)
 * </pre>
 *
 * or "ERR CODE TYPE" (sfld's error type, or "-" for one of this side) and exits with
 * CODE; the message goes to stderr. Exits 2 for a bad command line.
 */
public final class Drive {
    private Drive() {}

    public static void main(String[] argv) throws Exception {
        try {
            System.exit(run(argv));
        } catch (SnowFlockException e) {
            System.out.println("ERR " + e.exitCode() + " " + (e.type() == null ? "-" : e.type()));
            System.err.println("snowflock-drive: error: " + e.getMessage());
            System.exit(e.exitCode());
        }
    }

    private static Ticket named(String id) {
        return new Ticket(id, 1, 1);
    }

    private static int run(String[] a) throws Exception {
        String cmd = a.length > 0 ? a[0] : "";
        switch (cmd + "/" + a.length) {
            case "ticket/2" -> {
                Ticket t = SnowFlock.requestTicket(Integer.parseInt(a[1]));
                System.out.println("TICKET " + t.id() + " " + t.granted() + " " + t.requested());
            }
            case "clone/2" -> System.out.println("ID " + SnowFlock.clone(named(a[1])));
            case "checkpoint/1" -> {
                Checkpoint c = SnowFlock.checkpointParent();
                System.out.println("CKPT " + c.name() + " " + c.id());
            }
            case "create/3" -> {
                SnowFlock.createClones(a[1], named(a[2]));
                System.out.println("CREATED");
            }
            case "join/2" -> {
                List<CloneStatus> clones = SnowFlock.join(named(a[1]));
                for (CloneStatus c : clones) {
                    System.out.println("CLONE " + c.id() + " " + c.state() + " " + c.status());
                }
                System.out.println("COUNT " + clones.size());
            }
            case "kill/2" -> System.out.println("KILLED " + SnowFlock.kill(named(a[1])).stream()
                    .filter(c -> c.state().equals("killed")).count());
            case "exit/2" -> SnowFlock.exit(Integer.parseInt(a[1]));
            case "threads/2" -> threads(Integer.parseInt(a[1]));
            case "bench/2", "bench/3" -> bench(Integer.parseInt(a[1]), a.length == 3 ? a[2] : null);
            case "codes/1" -> codes();
            case "start/1" -> System.out.println("STARTED");
            default -> {
                System.err.println("usage: Drive ticket|clone|checkpoint|create|join|kill|exit|"
                        + "threads|bench|codes|start ...");
                return 2;
            }
        }
        return 0;
    }

    private static void threads(int n) throws Exception {
        String[] lines = new String[n];
        SnowFlockException[] errors = new SnowFlockException[n];
        List<Thread> threads = new ArrayList<>();
        long start = System.nanoTime();
        for (int k = 0; k < n; k++) {
            int i = k;
            Thread t = new Thread(() -> {
                try {
                    Ticket ticket = SnowFlock.requestTicket(1);
                    lines[i] = "THREAD " + i + " " + ticket.id() + " "
                            + SnowFlock.join(ticket).size();
                } catch (SnowFlockException e) {
                    errors[i] = e;
                }
            });
            t.start();
            threads.add(t);
        }
        for (Thread t : threads) {
            t.join();
        }
        for (int k = 0; k < n; k++) {
            if (errors[k] != null) {
                throw errors[k];
            }
            System.out.println(lines[k]);
        }
        System.out.printf("ELAPSED-MS %.1f%n", (System.nanoTime() - start) / 1e6);
    }

    private static void bench(int n, String ticket) throws SnowFlockException {
        long start = System.nanoTime();
        call(ticket);
        long first = System.nanoTime() - start;
        start = System.nanoTime();
        for (int k = 0; k < n; k++) {
            call(ticket);
        }
        System.out.printf("MEAN-MS %.3f FIRST-MS %.3f%n", (System.nanoTime() - start) / 1e6 / n,
                first / 1e6);
    }

    /** One round trip: a ticket for 1, or a join of ticket whatever its outcome. */
    private static void call(String ticket) throws SnowFlockException {
        if (ticket == null) {
            SnowFlock.requestTicket(1);
            return;
        }
        try {
            SnowFlock.join(named(ticket));
        } catch (SnowFlockException e) {
            // whatever the outcome: one round trip
        }
    }

    private static void codes() {
        String[] names = {"FAILED", "USAGE", "NOT_FOUND", "WRONG_STATE", "UNREACHABLE",
            "TIMEOUT", "SYSTEM"};
        int[] values = {SnowFlockException.FAILED, SnowFlockException.USAGE,
            SnowFlockException.NOT_FOUND, SnowFlockException.WRONG_STATE,
            SnowFlockException.UNREACHABLE, SnowFlockException.TIMEOUT,
            SnowFlockException.SYSTEM};
        for (int k = 0; k < names.length; k++) {
            System.out.println("CODE " + names[k] + " " + values[k]);
        }
    }
}
