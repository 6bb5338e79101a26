package org.snowflock.test;

import java.util.List;
import org.snowflock.CloneStatus;
import org.snowflock.SnowFlock;
import org.snowflock.SnowFlockException;
import org.snowflock.Ticket;

/**
 * The Java binding in a real guest (tests/integration/test_java_api.py): a ticket for
 * 2 clones, a fork; each clone prints its ID and exits with 40 + ID; the parent joins and
 * checks their statuses. Then the unhappy paths: a join of an unknown ticket
 * (NOT_FOUND), exit in the parent (WRONG_STATE). Then N round trips (joins of an unknown
 * ticket) timed. Prints JAVA-* lines and, last, "JAVA-TEST PASS" or "JAVA-TEST FAIL: why".
 */
public final class ForkTest {
    private ForkTest() {}

    public static void main(String[] argv) {
        try {
            test(argv.length > 0 ? Integer.parseInt(argv[0]) : 10);
            System.out.println("JAVA-TEST PASS");
        } catch (SnowFlockException e) {
            System.out.println("JAVA-TEST FAIL: " + e.getMessage() + " (code " + e.exitCode() + ")");
        } catch (AssertionError e) {
            System.out.println("JAVA-TEST FAIL: " + e.getMessage());
        }
    }

    private static void check(boolean ok, String why) {
        if (!ok) {
            throw new AssertionError(why);
        }
    }

    private static void test(int rounds) throws SnowFlockException {
        Ticket ticket = SnowFlock.requestTicket(2);
        System.out.println("JAVA-TICKET " + ticket.granted() + " " + ticket.requested());
        check(ticket.granted() == 2, "granted " + ticket.granted() + " of 2");
        long start = System.nanoTime();
        int me = SnowFlock.clone(ticket);
        if (me > 0) {
            System.out.println("JAVA-CLONE " + me);
            SnowFlock.exit(40 + me);
        }
        System.out.printf("JAVA-CLONE-MS %.0f%n", (System.nanoTime() - start) / 1e6);
        List<CloneStatus> clones = SnowFlock.join(ticket);
        for (CloneStatus c : clones) {
            System.out.println("JAVA-JOIN " + c.id() + " " + c.state() + " " + c.status());
        }
        check(clones.equals(List.of(new CloneStatus(1, "exited", 41),
                new CloneStatus(2, "exited", 42))), "joined " + clones);
        expect(SnowFlockException.NOT_FOUND, "JAVA-NOTFOUND", () -> SnowFlock.join(
                new Ticket("t999-nosuch", 1, 1)));
        expect(SnowFlockException.WRONG_STATE, "JAVA-WRONGSTATE", () -> SnowFlock.exit(0));
        start = System.nanoTime();
        for (int k = 0; k < rounds; k++) {
            try {
                SnowFlock.join(new Ticket("t999-nosuch", 1, 1));
            } catch (SnowFlockException e) {
                // one round trip, whatever its outcome
            }
        }
        System.out.printf("JAVA-BENCH MEAN-MS %.1f%n", (System.nanoTime() - start) / 1e6 / rounds);
    }

    private interface Call {
        void run() throws SnowFlockException;
    }

    private static void expect(int code, String tag, Call call) {
        try {
            call.run();
        } catch (SnowFlockException e) {
            System.out.println(tag + " " + e.exitCode() + " " + e.type());
            check(e.exitCode() == code, tag + ": code " + e.exitCode() + ", not " + code);
            return;
        }
        throw new AssertionError(tag + ": no exception");
    }
}
