package org.snowflock;

/**
 * One clone of a ticket, as {@link SnowFlock#join(Ticket)} and {@link SnowFlock#kill(Ticket)}
 * report it.
 *
 * @param id 1..granted
 * @param state "exited", "killed", "crashed" (or "running")
 * @param status what the clone passed to {@link SnowFlock#exit(int)}; -1 if it did not exit
 */
public record CloneStatus(int id, String state, int status) {}
