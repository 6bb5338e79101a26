package org.snowflock;

/**
 * A SnowFlock call failed. {@link #exitCode()} is the exit status the guest tools give
 * the same failure (sflib/exitcodes.py, the project's one table; snowflock.h's SF_E*):
 * sfld's error types map to them as in libsnowflock (UsageError 2, NotFoundError 3,
 * WrongStateError 4, UnreachableError 5, OperationTimeout 99, SystemFailure 111,
 * any other 1). The message is sfld's, with its hint in parentheses, or says which
 * local step failed (its cause then holds the IOException).
 */
public class SnowFlockException extends Exception {
    private static final long serialVersionUID = 1L;

    /** The operation failed. */
    public static final int FAILED = 1;
    /** A bad argument, e.g. n &lt; 1. */
    public static final int USAGE = 2;
    /** No such ticket or checkpoint. */
    public static final int NOT_FOUND = 3;
    /** Not allowed now: exit in the parent, join in a clone, a second fork in flight. */
    public static final int WRONG_STATE = 4;
    /** Neither the agent's socket nor the XenStore port: not a SnowFlock VM. */
    public static final int UNREACHABLE = 5;
    /** The host timed out. */
    public static final int TIMEOUT = 99;
    /** A system call failed (see the cause), the reply was not sfld's, or sfld failed. */
    public static final int SYSTEM = 111;

    private final int exitCode;
    private final String type;

    /** An error of this side, not sfld's: {@link #type()} is null. */
    public SnowFlockException(int exitCode, String message, Throwable cause) {
        super(message, cause);
        this.exitCode = exitCode;
        this.type = null;
    }

    SnowFlockException(String type, String message) {
        super(message);
        this.exitCode = codeOf(type);
        this.type = type;
    }

    /** The tools' exit status for this failure (one of the constants above). */
    public int exitCode() {
        return exitCode;
    }

    /** sfld's error type (e.g. "NotFoundError"), or null for a failure on this side. */
    public String type() {
        return type;
    }

    static int codeOf(String type) {
        if (type == null) {
            return FAILED;
        }
        switch (type) {
            case "UsageError":
                return USAGE;
            case "NotFoundError":
                return NOT_FOUND;
            case "WrongStateError":
                return WRONG_STATE;
            case "UnreachableError":
                return UNREACHABLE;
            case "OperationTimeout":
                return TIMEOUT;
            case "SystemFailure":
                return SYSTEM;
            default:
                return FAILED;
        }
    }
}
